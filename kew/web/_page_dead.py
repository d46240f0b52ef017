"""The page's dead letters of a queue, and acting on them: requeue or
purge one, the selected ones, or all, each after a confirmation page.

Both steps are forms posted with the page's session, so each carries the
session's CSRF token (checked by the guard) and needs the ``admin`` scope;
the action itself is logged at INFO by ``kew.web.audit`` with who did it,
then the browser is sent back to the list (POST, redirect, GET)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from litestar import Request, Response, get, post
from litestar.exceptions import ValidationException
from litestar.params import Parameter
from litestar.response import Redirect

from kew.web._errors import NoSuchQueue
from kew.web._render import PAGE, PAGE_ADMIN, render
from kew.web._state import WebState, audited, id_list, web_state

#: Dead letters listed on the page.
DEAD_SHOWN = 200
Act = Literal["requeue", "purge"]
_DONE = {"requeue": "Requeued", "purge": "Purged"}


def _known(web: WebState, queue: str) -> str:
    if not web.backend.known(queue):
        raise NoSuchQueue(detail=f"no queue named {queue!r}")
    return queue


def _dead_url(web: WebState, queue: str, **args: str) -> str:
    url = web.link(f"/ui/queues/{quote(queue, safe='')}/dead")
    return url + ("?" + urlencode(args) if args else "")


@get("/ui/queues/{queue:str}/dead", include_in_schema=False, opt=PAGE)
async def dead_page(
    request: Request[Any, Any, Any],
    queue: Annotated[str, Parameter()],
    done: Annotated[str | None, Parameter()] = None,
    count: Annotated[int | None, Parameter()] = None,
) -> Response[str]:
    web = web_state(request.app.state)
    _known(web, queue)
    flash = ""
    if done in _DONE and count is not None:
        flash = f"{_DONE[done]} {count} dead letter{'' if count == 1 else 's'}."
    return render(
        request,
        "dead.html",
        heading=f"dead letters of {queue}",
        queue=queue,
        dead=await web.backend.dead_letters(queue, DEAD_SHOWN),
        flash=flash,
        base=_dead_url(web, queue),
    )


def _wanted(action: str, ids: list[str]) -> tuple[Act, list[str] | None]:
    """What a button of the list asks: ``requeue-all``, ``purge-selected``
    (the ticked ``ids``), ``requeue:<id>`` (one) ..."""
    verb, sep, one = action.partition(":")
    if sep and verb in _DONE:
        return verb, [one]  # type: ignore[return-value]
    verb, _, which = action.partition("-")
    if verb not in _DONE or which not in ("all", "selected"):
        raise ValidationException(detail=f"unknown action {action!r}")
    return verb, None if which == "all" else ids  # type: ignore[return-value]


@post(
    "/ui/queues/{queue:str}/dead/confirm",
    include_in_schema=False,
    opt=PAGE_ADMIN,
    status_code=200,
)
async def confirm(
    request: Request[Any, Any, Any], queue: Annotated[str, Parameter()]
) -> Response[str]:
    """The confirmation step: what the action will do, and a form doing it."""
    web = web_state(request.app.state)
    _known(web, queue)
    form = await request.form()
    action = form.get("action")
    ids = [i for i in form.getall("ids", []) if isinstance(i, str)]
    act, chosen = _wanted(action if isinstance(action, str) else "", ids)
    total = -1
    if chosen is None:
        [info] = await web.backend.queue_infos([queue])
        total = info.dead
    return render(
        request,
        "confirm.html",
        heading=f"{act} dead letters of {queue}",
        queue=queue,
        act=act,
        ids=chosen,
        total=total,
        back=_dead_url(web, queue),
        target=web.link(f"/ui/queues/{quote(queue, safe='')}/dead/{act}"),
    )


async def _act(request: Request[Any, Any, Any], queue: str, act: Act) -> Redirect:
    web = web_state(request.app.state)
    _known(web, queue)
    form = await request.form()
    if form.get("confirm") != "yes":
        raise ValidationException(detail="not confirmed: use the confirmation form")
    ids: list[str] | None = [i for i in form.getall("ids", []) if isinstance(i, str)]
    if form.get("all") == "yes":
        ids = None
    elif not ids:
        raise ValidationException(detail="no dead letters chosen")
    fn = web.backend.requeue if act == "requeue" else web.backend.purge
    verb = "requeued" if act == "requeue" else "purged"
    count = await audited(
        request,
        fn(queue, ids),
        lambda n: f"{verb} {n} dead letter(s) of {queue!r} (asked: {id_list(ids)}) via page",
    )
    return Redirect(_dead_url(web, queue, done=act, count=str(count)), status_code=303)


@post("/ui/queues/{queue:str}/dead/requeue", include_in_schema=False, opt=PAGE_ADMIN)
async def requeue_page(
    request: Request[Any, Any, Any], queue: Annotated[str, Parameter()]
) -> Redirect:
    return await _act(request, queue, "requeue")


@post("/ui/queues/{queue:str}/dead/purge", include_in_schema=False, opt=PAGE_ADMIN)
async def purge_page(
    request: Request[Any, Any, Any], queue: Annotated[str, Parameter()]
) -> Redirect:
    return await _act(request, queue, "purge")


#: The dead-letter routes of the page.
DEAD_PAGE_ROUTES = [dead_page, confirm, requeue_page, purge_page]
