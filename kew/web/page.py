"""The monitoring page: server-rendered HTML (Jinja2), a little JavaScript
to refresh the overview and follow a task's output live.

Pages: the overview (``/ui``: queues, trends, tasks with filters and
paging), a task (``/ui/tasks/{id}``, cancelled from there after a
confirmation page, ``admin``), dead letters with their actions
(:mod:`kew.web._page_dead`), workers and charts
(:mod:`kew.web._page_views`), the API reference (:mod:`kew.web._apidoc`),
and the login form.  Every link, form and script URL starts with the
configured root path; every form that changes something carries the
session's CSRF token (checked by the guard)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import ValidationException
from litestar.params import Parameter
from litestar.response import Redirect

from kew.task.model import TaskRecord
from kew.web._apidoc import APIDOC_ROUTES
from kew.web._errors import CsrfRefused
from kew.web._page_dead import DEAD_PAGE_ROUTES
from kew.web._page_views import VIEW_ROUTES
from kew.web._render import PAGE, PAGE_ADMIN, page_context, render
from kew.web._state import WebState, audit_log, audited, identity, web_state
from kew.web._stats import compute_stats
from kew.web._tasks import ask_cancel, task_record
from kew.web.auth import CSRF_FIELD, CSRF_HEADER, Sessions, token_identity
from kew.web.search import STATUSES, TaskQuery, parse_local, search_tasks, to_ms

log = logging.getLogger("kew.web")

#: Tasks per page of the overview.
PAGE_SIZE = 50
#: The filters the overview's form sends (query parameters of ``/ui``).
FILTERS = ("queue", "status", "since", "until", "error")


def _query(web: WebState, params: dict[str, str]) -> tuple[TaskQuery, str]:
    """The task query of the overview's form, and what is wrong with it."""
    problem = ""
    queue = params.get("queue") or ""
    status = params.get("status") or ""
    bounds: list[int | None] = []
    for name in ("since", "until"):
        try:
            bounds.append(to_ms(parse_local(params.get(name))))
        except ValueError:
            problem = f"{name}: not a date and time ({params.get(name)!r})"
            bounds.append(None)
    try:
        offset = max(0, int(params.get("offset") or 0))
    except ValueError:
        offset = 0
    q = TaskQuery(
        queues=(queue,) if queue in web.app.queues else (),
        statuses=(status,) if status in STATUSES else (),
        since=bounds[0],
        until=bounds[1],
        error=(params.get("error") or "").strip()[:500],
        limit=PAGE_SIZE + 1,  # one more: is there a next page?
        offset=offset,
    )
    return q, problem


async def overview_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The overview's data: the tasks found, the trends and the queues'
    depths, asked of the store and the broker together."""
    web = web_state(request.app.state)
    params = {k: str(v) for k, v in request.query_params.items()}
    q, problem = _query(web, params)
    only = q.queues[0] if q.queues else None
    found, stats, queues = await asyncio.gather(
        web.backend.on_store(lambda s: search_tasks(s, q)),
        compute_stats(web, 60, only),
        web.backend.queue_infos(),
    )
    kept = {k: params[k] for k in FILTERS if params.get(k)}

    def page_link(offset: int) -> str:
        args = {**kept, **({"offset": str(offset)} if offset else {})}
        return web.link("/ui") + ("?" + urlencode(args) if args else "")

    return {
        "queues": queues,
        "tasks": found[:PAGE_SIZE],
        "only": only,
        "filtered": q.filtered,
        "searching": bool(q.statuses or q.since or q.until or q.error),
        "problem": problem,
        "offset": q.offset,
        "newer": page_link(max(0, q.offset - PAGE_SIZE)) if q.offset else "",
        "older": page_link(q.offset + PAGE_SIZE) if len(found) > PAGE_SIZE else "",
        "stats": stats,
        "task_series": stats.tasks[0] if stats.tasks else None,
        "depth_series": stats.depth[0] if stats.depth else None,
    }


@get("/", include_in_schema=False, opt=PAGE)
async def root(request: Request[Any, Any, Any]) -> Redirect:
    return Redirect(web_state(request.app.state).link("/ui"))


@get("/ui", include_in_schema=False, opt=PAGE)
async def index(request: Request[Any, Any, Any]) -> Response[str]:
    web = web_state(request.app.state)
    form = {k: str(request.query_params.get(k) or "") for k in FILTERS}
    return render(
        request,
        "index.html",
        heading="Overview",
        form=form,
        task_queues=sorted(web.app.queues),
        statuses=STATUSES,
        **await overview_context(request),
    )


@get("/ui/overview", include_in_schema=False, opt=PAGE)
async def overview(request: Request[Any, Any, Any]) -> Response[str]:
    return render(request, "_overview.html", **await overview_context(request))


async def _task_record(request: Request[Any, Any, Any], task_id: str) -> TaskRecord:
    return await task_record(web_state(request.app.state).backend, task_id)


#: What the task page says after a cancel (its ``cancel`` query parameter).
_CANCEL_FLASH = {
    "asked": "Cancel asked: the task ends cancelled once its worker acts on it.",
    "done": "The task is cancelled.",
    "final": "The task had ended already: nothing was cancelled.",
}


@get("/ui/tasks/{task_id:str}", include_in_schema=False, opt=PAGE)
async def task_page(
    request: Request[Any, Any, Any],
    task_id: Annotated[str, Parameter()],
    cancel: Annotated[str | None, Parameter()] = None,
) -> Any:
    return render(
        request,
        "task.html",
        heading=f"task {task_id}",
        task=await _task_record(request, task_id),
        flash=_CANCEL_FLASH.get(cancel or "", ""),
    )


def _task_url(web: WebState, task_id: str, **args: str) -> str:
    url = web.link(f"/ui/tasks/{quote(task_id, safe='')}")
    return url + ("?" + urlencode(args) if args else "")


@get("/ui/tasks/{task_id:str}/cancel", include_in_schema=False, opt=PAGE_ADMIN)
async def cancel_confirm(
    request: Request[Any, Any, Any], task_id: Annotated[str, Parameter()]
) -> Response[str]:
    """The confirmation step: what cancelling will do, and a form doing it."""
    web = web_state(request.app.state)
    task = await _task_record(request, task_id)
    return render(
        request,
        "task_cancel.html",
        heading=f"cancel task {task_id}",
        task=task,
        back=_task_url(web, task_id),
        target=_task_url(web, task_id) + "/cancel",
    )


@post("/ui/tasks/{task_id:str}/cancel", include_in_schema=False, opt=PAGE_ADMIN)
async def cancel_page(
    request: Request[Any, Any, Any], task_id: Annotated[str, Parameter()]
) -> Redirect:
    """Cancel (the form of the confirmation page: CSRF checked by the guard),
    then back to the task's page (POST, redirect, GET)."""
    web = web_state(request.app.state)
    form = await request.form()
    if form.get("confirm") != "yes":
        raise ValidationException(detail="not confirmed: use the confirmation form")
    who = identity(request)
    result = await audited(
        request,
        ask_cancel(web.backend, task_id, str(who) if who else ""),
        lambda r: f"asked to cancel task {task_id!r} via page: {r.detail}",
    )
    outcome = (
        "final" if not result.cancelled else "done" if result.status == "cancelled" else "asked"
    )
    return Redirect(_task_url(web, task_id, cancel=outcome), status_code=303)


@get("/ui/tasks/{task_id:str}/status", include_in_schema=False, opt=PAGE)
async def task_status(request: Request[Any, Any, Any], task_id: Annotated[str, Parameter()]) -> Any:
    return render(request, "_task.html", task=await _task_record(request, task_id))


@get("/ui/login", include_in_schema=False, opt={"scope": "public"})
async def login_form(request: Request[Any, Any, Any]) -> Response[str]:
    return render(request, "login.html", heading="sign in", nav=False)


@post("/ui/login", include_in_schema=False, opt={"scope": "public"}, status_code=303)
async def login(request: Request[Any, Any, Any]) -> Response[Any]:
    web = web_state(request.app.state)
    form = await request.form()
    token = form.get("token")
    who = token_identity(web.config.tokens, token) if isinstance(token, str) else None
    if who is None:
        audit_log.info("audit: page login refused (unknown token)")
        return render(
            request, "login.html", 401, heading="sign in", nav=False, error="Unknown token."
        )
    sid = web.sessions.open(who)
    audit_log.info("audit: page login with token %r (%s)", who.name, who.scope)
    return Redirect(
        web.link("/ui"),
        status_code=303,
        cookies=[
            Cookie(
                key=Sessions.COOKIE,
                value=sid,
                path=web.link("/"),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                max_age=int(web.config.session_hours * 3600),
            )
        ],
    )


@post("/ui/logout", include_in_schema=False, opt={"scope": "public"}, status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    web = web_state(request.app.state)
    sid = request.cookies.get(Sessions.COOKIE)
    session = web.sessions.get(sid)
    if session is not None:
        form = await request.form()
        presented = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not session.csrf_ok(presented if isinstance(presented, str) else None):
            raise CsrfRefused()  # another site cannot log the visitor out either
        audit_log.info("audit: %s logged out", session.identity)
    web.sessions.close(sid)
    return Redirect(
        web.link("/ui/login"),
        status_code=303,
        cookies=[Cookie(key=Sessions.COOKIE, value="", path=web.link("/"), max_age=0)],
    )


def page_routes() -> list[Any]:
    """Every route of the page."""
    return [
        root,
        index,
        overview,
        task_page,
        task_status,
        cancel_confirm,
        cancel_page,
        login_form,
        login,
        logout,
        *DEAD_PAGE_ROUTES,
        *VIEW_ROUTES,
        *APIDOC_ROUTES,
    ]


__all__ = ["page_context", "page_routes"]
