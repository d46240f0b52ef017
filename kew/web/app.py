"""The REST front end: Litestar routes over a :class:`kew.task.App`.

``create_app(app, config)`` builds the ASGI application; ``kew serve
MODULE:APP`` runs it under uvicorn (:mod:`kew.web.cli`).  Every route but
``/health`` needs a bearer token (``read`` scope; dead-letter requeue/purge
need ``admin``); the monitoring page (``/ui``) logs in with a token and
keeps a session cookie, and whatever it changes carries the session's CSRF
token.

The routes live by concern in :mod:`kew.web._tasks`, :mod:`kew.web._queues`,
:mod:`kew.web._monitoring`, :mod:`kew.web._stats` and :mod:`kew.web.page`
(with the page's own modules); errors and their handlers in
:mod:`kew.web._errors`; the OpenAPI document's completion and its HTML
rendering in :mod:`kew.web._openapi` and :mod:`kew.web._apidoc`.  Handlers,
the guard and the lifespan hooks find the served app, its settings,
:class:`Backend`, page sessions and depth history in the application's
``state`` (:mod:`kew.web._state`).

Every handler is a coroutine: the broker is reached through the web's own
async connector (:mod:`kew.web._broker`, kew.aio), submits through
``TaskQueue.submit_async``, and the task store, a sync API, on one thread of
the web's (:mod:`kew.web._store`).

Behind a reverse proxy under a path prefix (``config.root_path``, e.g.
``/kew``), the application answers both forms of request: with the prefix
(a proxy that passes the path as is) and without it (one that strips it);
every link, form, redirect and URL it makes starts with the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler
from litestar.types import (
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Receive,
    Scope,
    Send,
)

from kew.web._errors import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    EXCEPTION_HANDLERS,
    BadBody,
    BadValue,
    CsrfRefused,
    Forbidden,
    LoginRequired,
    NoSuchQueue,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from kew.web._monitoring import MONITORING_ROUTES, Health
from kew.web._openapi import complete_openapi, openapi_config
from kew.web._queues import QUEUE_ROUTES, Count, DeadLetterIds
from kew.web._state import STATE_KEY, WebState, set_identity, web_state
from kew.web._stats import STATS_ROUTES, take_sample
from kew.web._tasks import MAX_DELAY, OUTPUT_POLL, Submitted, task_routes
from kew.web._workers import WORKER_ROUTES
from kew.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SAFE_METHODS,
    Identity,
    Sessions,
    bearer_identity,
)
from kew.web.backend import Backend, TaskApp
from kew.web.config import WebConfig
from kew.web.history import DepthHistory, Sampler

__all__ = [
    "ADMIN_ERRORS",
    "AUTH_ERRORS",
    "MAX_DELAY",
    "OUTPUT_POLL",
    "BadBody",
    "BadValue",
    "Count",
    "CsrfRefused",
    "DeadLetterIds",
    "Forbidden",
    "Health",
    "LoginRequired",
    "NoSuchQueue",
    "Submitted",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "create_app",
    "guard",
]


class KewLitestar(Litestar):
    """Litestar, answering under ``root_path`` as well as without it."""

    __slots__ = ("kew_root",)

    def __init__(self, *args: Any, root_path: str = "", **kwargs: Any) -> None:
        self.kew_root = root_path
        super().__init__(*args, **kwargs)

    async def __call__(
        self,
        scope: Scope | LifeSpanScope,
        receive: Receive | LifeSpanReceive,
        send: Send | LifeSpanSend,
    ) -> None:
        if scope["type"] in ("http", "websocket"):
            root = self.kew_root or scope.get("root_path", "").rstrip("/")
            if root:
                scope = _under(scope, root)
        await super().__call__(scope, receive, send)


def _under(scope: Scope, root: str) -> Scope:
    """The scope of a request to an app served under ``root``: its path without
    the prefix (when it has it), ``app_root_path`` (what Litestar's
    ``base_url`` starts with) the prefix, ``root_path`` empty (Litestar would
    cut its path at the first occurrence of ``root_path`` anywhere)."""
    moved = cast(dict[str, Any], dict(scope))
    path: str = moved["path"]
    if path == root or path.startswith(root + "/"):
        moved["path"] = path[len(root) :] or "/"
        raw = moved.get("raw_path")
        if isinstance(raw, bytes) and raw.startswith(root.encode()):
            moved["raw_path"] = raw[len(root) :] or b"/"
    moved["root_path"] = ""
    moved["app_root_path"] = root
    return cast(Scope, moved)


def create_app(
    app: TaskApp, config: WebConfig | None = None, *, routes: Sequence[Any] = ()
) -> Litestar:
    """The Litestar application serving ``app``'s queues and tasks.

    ``routes``: more Litestar route handlers (or routers) to serve, behind the
    same tokens: a handler's ``opt={"scope": ...}`` says which it needs,
    ``"read"`` (the default), ``"admin"`` or ``"public"`` (no token).
    ``Litestar.register`` adds one later the same way."""
    from kew.web.page import page_routes

    config = config or WebConfig()
    backend = Backend(app)
    sessions = Sessions(config.session_hours * 3600)
    history = DepthHistory(config.history_hours * 3600)
    return KewLitestar(
        route_handlers=[
            *task_routes(sorted(app.queues)),
            *QUEUE_ROUTES,
            *MONITORING_ROUTES,
            *STATS_ROUTES,
            *WORKER_ROUTES,
            *page_routes(),
            *routes,
        ],
        guards=[guard],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        request_max_body_size=config.max_body_bytes,
        state=State({STATE_KEY: WebState(app, config, backend, sessions, history)}),
        on_startup=[_on_startup],
        on_shutdown=[_on_shutdown],
        openapi_config=openapi_config(config.title, config.root_path),
        root_path=config.root_path,
    )


def _is_form(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    kind = connection.headers.get("content-type", "")
    return kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))


async def _identify(
    connection: ASGIConnection[Any, Any, Any, Any], web: WebState
) -> Identity | None:
    """Who makes the request: its bearer token or, without a header, its
    page session; a session request that changes something must carry the
    session's CSRF token (:class:`CsrfRefused` otherwise)."""
    header = connection.headers.get("authorization")
    if header is not None:
        return bearer_identity(web.config.tokens, header)
    session = web.sessions.get(connection.cookies.get(Sessions.COOKIE))
    if session is None:
        return None
    if connection.scope.get("method", "GET") not in SAFE_METHODS:
        presented = connection.headers.get(CSRF_HEADER)
        if presented is None and isinstance(connection, Request) and _is_form(connection):
            value = (await connection.form()).get(CSRF_FIELD)
            presented = value if isinstance(value, str) else None
        if not session.csrf_ok(presented):
            raise CsrfRefused()
    return session.identity


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The application's guard: the scope a route's ``opt["scope"]`` needs
    (``read`` by default, ``admin``, or ``public``); pages (``opt["page"]``)
    send a visitor without a session to the login form."""
    need = handler.opt.get("scope", "read")
    if need == "public":
        return
    who = await _identify(connection, web_state(connection.app.state))
    if who is None:
        if handler.opt.get("page"):
            raise LoginRequired()
        raise Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="kew"'})
    if need == "admin" and who.scope != "admin":
        raise Forbidden()
    set_identity(connection, who)


async def _on_startup(asgi: Litestar) -> None:
    web = web_state(asgi.state)
    complete_openapi(asgi, web.app)
    web.backend.open()
    web.samplers.append(Sampler(lambda: take_sample(web), web.config.sample_seconds).start())


async def _on_shutdown(asgi: Litestar) -> None:
    web = web_state(asgi.state)
    while web.samplers:
        await web.samplers.pop().stop()
    await web.backend.close()
