"""The monitoring page: server-rendered HTML (Jinja2), a little JavaScript
to refresh the overview and follow a task's output live."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import jinja2
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotFoundException
from litestar.params import Parameter
from litestar.response import Redirect

from kew.web.auth import Sessions, bearer_scope
from kew.web.backend import Backend
from kew.web.config import WebConfig

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("kew.web", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _n(value: int) -> str:
    return "?" if value < 0 else str(value)


_env.globals.update(when=_when, n=_n)

HTML = "text/html; charset=utf-8"
PAGE = {"page": True}


def page_routes(backend: Backend, config: WebConfig, sessions: Sessions) -> list[Any]:
    def render(name: str, status: int = 200, **context: Any) -> Response[str]:
        context.setdefault("title", config.title)
        context.setdefault("heading", "")
        context.setdefault("nav", True)
        return Response(
            _env.get_template(name).render(**context),
            media_type=HTML,
            status_code=status,
            headers={"Cache-Control": "no-store"},
        )

    def overview_context(queue: str | None) -> dict[str, Any]:
        if queue is not None and queue not in backend.app.queues:
            queue = None
        return {
            "queues": backend.queue_infos(),
            "tasks": backend.store(lambda s: list(s.recent(limit=50, queue=queue))),
            "only": queue,
        }

    @get("/", include_in_schema=False, opt=PAGE)
    async def root() -> Redirect:
        return Redirect("/ui")

    @get("/ui", include_in_schema=False, opt=PAGE, sync_to_thread=True)
    def index(
        queue: Annotated[str | None, Parameter(description="only this queue")] = None,
    ) -> Response[str]:
        return render("index.html", heading="Overview", **overview_context(queue))

    @get("/ui/overview", include_in_schema=False, opt=PAGE, sync_to_thread=True)
    def overview(
        queue: Annotated[str | None, Parameter(description="only this queue")] = None,
    ) -> Response[str]:
        return render("_overview.html", **overview_context(queue))

    def task_record(task_id: str) -> Any:
        rec = backend.store(lambda s: s.get(task_id))
        if rec is None:
            raise NotFoundException(detail=f"no task {task_id!r}")
        return rec

    @get("/ui/tasks/{task_id:str}", include_in_schema=False, opt=PAGE, sync_to_thread=True)
    def task_page(task_id: Annotated[str, Parameter()]) -> Response[str]:
        return render("task.html", heading=f"task {task_id}", task=task_record(task_id))

    @get("/ui/tasks/{task_id:str}/status", include_in_schema=False, opt=PAGE, sync_to_thread=True)
    def task_status(task_id: Annotated[str, Parameter()]) -> Response[str]:
        return render("_task.html", task=task_record(task_id))

    @get("/ui/queues/{queue:str}/dead", include_in_schema=False, opt=PAGE, sync_to_thread=True)
    def dead_page(queue: Annotated[str, Parameter()]) -> Response[str]:
        if not backend.known(queue):
            raise NotFoundException(detail=f"no queue named {queue!r}")
        return render(
            "dead.html",
            heading=f"dead letters of {queue}",
            queue=queue,
            dead=backend.dead_letters(queue, 200),
        )

    @get("/ui/login", include_in_schema=False, opt={"scope": "public"})
    async def login_form() -> Response[str]:
        return render("login.html", heading="sign in", nav=False)

    @post("/ui/login", include_in_schema=False, opt={"scope": "public"}, status_code=303)
    async def login(request: Request[Any, Any, Any]) -> Response[Any]:
        form = await request.form()
        token = form.get("token")
        scope = bearer_scope(config.tokens, f"Bearer {token}") if isinstance(token, str) else None
        if scope is None:
            return render("login.html", 401, heading="sign in", nav=False, error="Unknown token.")
        sid = sessions.open(scope)
        return Redirect(
            "/ui",
            status_code=303,
            cookies=[
                Cookie(
                    key=Sessions.COOKIE,
                    value=sid,
                    path="/",
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                    max_age=int(config.session_hours * 3600),
                )
            ],
        )

    @post("/ui/logout", include_in_schema=False, opt={"scope": "public"}, status_code=303)
    async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
        sessions.close(request.cookies.get(Sessions.COOKIE))
        return Redirect(
            "/ui/login",
            status_code=303,
            cookies=[Cookie(key=Sessions.COOKIE, value="", path="/", max_age=0)],
        )

    return [root, index, overview, task_page, task_status, dead_page, login_form, login, logout]
