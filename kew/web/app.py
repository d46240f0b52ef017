"""The REST front end: Litestar routes over a :class:`kew.task.App`.

``create_app(app, config)`` builds the ASGI application; ``kew serve
MODULE:APP`` runs it under uvicorn (:mod:`kew.web.cli`).  Every route but
``/health`` needs a bearer token (``read`` scope; dead-letter requeue/purge
need ``admin``); the monitoring page (``/ui``) logs in with a token and
keeps a session cookie.

The routes live by concern in :mod:`kew.web._tasks`, :mod:`kew.web._queues`,
:mod:`kew.web._monitoring` and :mod:`kew.web.page`; errors and their
handlers in :mod:`kew.web._errors`; the OpenAPI document's completion in
:mod:`kew.web._openapi`.  Handlers, the guard and the lifespan hooks find
the served app, its settings, :class:`Backend` and page sessions in the
application's ``state`` (:mod:`kew.web._state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler

from kew.web._errors import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    EXCEPTION_HANDLERS,
    BadBody,
    BadValue,
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
from kew.web._state import STATE_KEY, WebState, web_state
from kew.web._tasks import MAX_DELAY, OUTPUT_POLL, Submitted, task_routes
from kew.web.auth import Sessions, bearer_scope
from kew.web.backend import Backend, TaskApp
from kew.web.config import Scope, WebConfig

__all__ = [
    "ADMIN_ERRORS",
    "AUTH_ERRORS",
    "MAX_DELAY",
    "OUTPUT_POLL",
    "BadBody",
    "BadValue",
    "Count",
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
    return Litestar(
        route_handlers=[
            *task_routes(sorted(app.queues)),
            *QUEUE_ROUTES,
            *MONITORING_ROUTES,
            *page_routes(backend, config, sessions),
            *routes,
        ],
        guards=[guard],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        request_max_body_size=config.max_body_bytes,
        state=State({STATE_KEY: WebState(app, config, backend, sessions)}),
        on_startup=[_on_startup],
        on_shutdown=[_on_shutdown],
        openapi_config=openapi_config(config.title),
    )


def _identify(connection: ASGIConnection[Any, Any, Any, Any], web: WebState) -> Scope | None:
    """The scope of the request's bearer token, or (GET and HEAD only) of
    its page session; None without either."""
    header = connection.headers.get("authorization")
    if header is not None:
        return bearer_scope(web.config.tokens, header)
    if connection.scope.get("method", "GET") in ("GET", "HEAD"):
        return web.sessions.scope(connection.cookies.get(Sessions.COOKIE))
    return None


def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The application's guard: the scope a route's ``opt["scope"]`` needs
    (``read`` by default, ``admin``, or ``public``); pages (``opt["page"]``)
    send a visitor without a session to the login form."""
    need = handler.opt.get("scope", "read")
    if need == "public":
        return
    scope = _identify(connection, web_state(connection.app.state))
    if scope is None:
        if handler.opt.get("page"):
            raise LoginRequired()
        raise Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="kew"'})
    if need == "admin" and scope != "admin":
        raise Forbidden()


def _on_startup(asgi: Litestar) -> None:
    complete_openapi(asgi, web_state(asgi.state).app)


def _on_shutdown(asgi: Litestar) -> None:
    web_state(asgi.state).backend.close()
