"""The REST front end: Litestar routes over a :class:`kew.task.App`.

``create_app(app, config)`` builds the ASGI application; ``kew serve`` runs
it under uvicorn (see :mod:`kew.web.serve`).  Every route but ``/health``
needs a bearer token (``read`` scope; dead-letter requeue/purge need
``admin``); the monitoring page (``/ui``) logs in with a token and keeps a
session cookie.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    Reference,
    RequestBody,
    SecurityScheme,
)
from litestar.params import Parameter
from litestar.response import Stream

from kew.qchan.codec import DecodeError
from kew.qchan.spi import BrokerUnavailable, MessageTooLarge, QueueFull, now_ms
from kew.task.model import TaskEvent, TaskRecord, WorkerRecord
from kew.web import validate
from kew.web.auth import Sessions, bearer_scope
from kew.web.backend import Backend, DeadLetterOut, QueueInfo, TaskApp
from kew.web.config import Scope, WebConfig

log = logging.getLogger("kew.web")
R = TypeVar("R")

OUTPUT_POLL = 0.25
MAX_DELAY = 366 * 86400.0


# -- response types (the OpenAPI document is generated from these) ----------


class Submitted(msgspec.Struct, frozen=True):
    """A task accepted: poll ``status_url``; ``output_url`` streams its output."""

    id: str
    status: Literal["queued"]
    status_url: str
    output_url: str


class DeadLetterIds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which dead letters: ``ids``, or all of them when absent."""

    ids: list[str] | None = None


class Count(msgspec.Struct, frozen=True):
    count: int


class Health(msgspec.Struct, frozen=True):
    """``ok`` when the broker answers; ``workers`` seen within the window."""

    status: Literal["ok", "unavailable"]
    broker: bool
    workers: list[WorkerRecord]
    detail: str = ""


# -- errors (documented per route with ``raises``) --------------------------


class BadBody(ClientException):
    """400; documented through Litestar's own 400 (ValidationException),
    which every route with parameters lists: one 400 schema per route."""

    status_code = 400
    detail = "the body is not valid JSON"


class BadValue(ClientException):
    status_code = 422
    detail = "the body does not fit the queue's type"


class TooLarge(ClientException):
    status_code = 413
    detail = "the request body is larger than the maximum"


class Unavailable(HTTPException):
    status_code = 503
    detail = "the broker is unavailable or the queue is full; retry later"


class Unauthorized(NotAuthorizedException):
    detail = "a bearer token is required"


class Forbidden(PermissionDeniedException):
    detail = "this needs a token with the admin scope"


class NoSuchQueue(NotFoundException):
    detail = "no such queue"


AUTH_ERRORS: list[type[HTTPException]] = [Unauthorized]
ADMIN_ERRORS: list[type[HTTPException]] = [Unauthorized, Forbidden]


class LoginRequired(Exception):
    """A page was asked for without a session: go to the login form."""


# -- helpers ------------------------------------------------------------------


async def _thread(fn: Callable[..., R], *args: Any) -> R:
    return await anyio.to_thread.run_sync(partial(fn, *args))


def _base(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/")


def create_app(
    app: TaskApp, config: WebConfig | None = None, *, routes: Sequence[Any] = ()
) -> Litestar:
    """The Litestar application serving ``app``'s queues and tasks.

    ``routes``: more Litestar route handlers (or routers) to serve, behind the
    same tokens: a handler's ``opt={"scope": ...}`` says which it needs,
    ``"read"`` (the default), ``"admin"`` or ``"public"`` (no token).
    ``Litestar.register`` adds one later the same way."""
    config = config or WebConfig()
    backend = Backend(app)
    sessions = Sessions(config.session_hours * 3600)

    # -- authentication --------------------------------------------------------

    def identify(connection: ASGIConnection[Any, Any, Any, Any]) -> Scope | None:
        header = connection.headers.get("authorization")
        if header is not None:
            return bearer_scope(config.tokens, header)
        if connection.scope.get("method", "GET") in ("GET", "HEAD"):
            return sessions.scope(connection.cookies.get(Sessions.COOKIE))
        return None

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        need = handler.opt.get("scope", "read")
        if need == "public":
            return
        scope = identify(connection)
        if scope is None:
            if handler.opt.get("page"):
                raise LoginRequired()
            raise Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="kew"'})
        if need == "admin" and scope != "admin":
            raise Forbidden()

    # -- tasks -------------------------------------------------------------------

    def submit_route(name: str) -> HTTPRouteHandler:
        tq = app.queues[name]

        def submit_sync(body: bytes, delay: float | None) -> str:
            try:
                data = tq.decode_json(body)
            except DecodeError as e:
                try:
                    validate.parse(body, tq.type)
                except validate.Invalid as bad:
                    cls = BadBody if bad.status == 400 else BadValue
                    raise cls(extra=bad.reasons) from None
                raise BadValue(extra=[str(e)]) from None
            task_id = str(tq.submit(data, delay=delay))
            if getattr(tq, "track", True):
                # The queued event travels to the recorder too; recording it
                # here as well (idempotent) means the status URL answers at once.
                at = now_ms()
                next_at = at + round(delay * 1000) if delay else None
                event = TaskEvent(task_id, name, "queued", at, next_at=next_at)
                try:
                    backend.store(lambda s: s.apply([event]))
                except Exception:
                    log.warning("kew.web: could not record task %s as queued", task_id)
            return task_id

        async def submit(
            request: Request[Any, Any, Any],
            delay: Annotated[
                float | None,
                Parameter(ge=0, le=MAX_DELAY, description="seconds before the task may run"),
            ] = None,
        ) -> Response[Submitted]:
            body = await request.body()
            try:
                task_id = await _thread(submit_sync, body, delay)
            except MessageTooLarge as e:
                raise TooLarge(detail=str(e)) from None
            except (QueueFull, BrokerUnavailable) as e:
                raise Unavailable(detail=str(e), headers={"Retry-After": "5"}) from None
            base = _base(request)
            status_url = f"{base}/tasks/{task_id}"
            return Response(
                Submitted(task_id, "queued", status_url, f"{status_url}/output"),
                status_code=202,
                headers={"Location": status_url},
            )

        return post(
            f"/queues/{name}/tasks",
            status_code=202,
            summary=f"Submit a task to {name}",
            operation_id=f"submit_{_op_name(name)}",
            raises=[BadValue, TooLarge, Unavailable, *AUTH_ERRORS],
            tags=["tasks"],
        )(submit)

    @post(
        "/queues/{queue:str}/tasks",
        status_code=202,
        summary="Submit a task to a queue this server does not serve",
        description="Every served queue has its own route; any other name is 404.",
        raises=[NoSuchQueue, *AUTH_ERRORS],
        tags=["tasks"],
    )
    async def submit_unknown(
        queue: Annotated[str, Parameter(description="queue name")],
    ) -> Submitted:
        raise NoSuchQueue(detail=f"no task queue named {queue!r}")

    @get(
        "/tasks",
        summary="Recent tasks, newest first",
        raises=AUTH_ERRORS,
        tags=["tasks"],
        sync_to_thread=True,
    )
    def recent_tasks(
        limit: int = Parameter(default=50, ge=1, le=1000),
        queue: str | None = Parameter(default=None, max_length=200),
    ) -> list[TaskRecord]:
        return backend.store(lambda s: list(s.recent(limit=limit, queue=queue)))

    def _record(task_id: str) -> TaskRecord:
        rec: TaskRecord | None = backend.store(lambda s: s.get(task_id))
        if rec is None:
            raise NotFoundException(detail=f"no task {task_id!r}")
        return rec

    @get(
        "/tasks/{task_id:str}",
        summary="A task's status",
        raises=[NotFoundException, *AUTH_ERRORS],
        tags=["tasks"],
        sync_to_thread=True,
    )
    def task_status(task_id: Annotated[str, Parameter(description="task id")]) -> TaskRecord:
        return _record(task_id)

    @get(
        "/tasks/{task_id:str}/output",
        summary="A task's output (text, streamed)",
        description="Follows a running task until it is final; `follow=false` returns "
        "what there is now.",
        raises=[NotFoundException, *AUTH_ERRORS],
        tags=["tasks"],
        media_type="text/plain",
    )
    async def task_output(
        task_id: Annotated[str, Parameter(description="task id")],
        follow: Annotated[bool, Parameter(description="follow until final")] = True,
    ) -> Stream:
        await _thread(_record, task_id)

        async def chunks() -> AsyncIterator[str]:
            offset = 0
            deadline = time.monotonic() + config.follow_timeout
            final_seen = 0
            while True:
                text, offset = await _thread(backend.store, partial(_output, task_id, offset))
                if text:
                    yield text
                if not follow or time.monotonic() > deadline:
                    return
                rec = await _thread(backend.store, lambda s: s.get(task_id))
                if rec is None or rec.status in ("succeeded", "failed"):
                    final_seen += 1
                    if final_seen > 2 and not text:  # chunks recorded after the final event
                        return
                await asyncio.sleep(OUTPUT_POLL)

        return Stream(
            chunks(),
            media_type="text/plain",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- queues --------------------------------------------------------------------

    def _known(queue: str) -> str:
        if not backend.known(queue):
            raise NoSuchQueue(detail=f"no queue named {queue!r}")
        return queue

    @get(
        "/queues",
        summary="Every queue: depths",
        raises=AUTH_ERRORS,
        tags=["queues"],
        sync_to_thread=True,
    )
    def queues() -> list[QueueInfo]:
        return backend.queue_infos()

    @get(
        "/queues/{queue:str}/dead",
        summary="A queue's dead letters",
        raises=[NoSuchQueue, *AUTH_ERRORS],
        tags=["queues"],
        sync_to_thread=True,
    )
    def dead_letters(
        queue: Annotated[str, Parameter(description="queue name")],
        limit: int = Parameter(default=100, ge=1, le=1000),
    ) -> list[DeadLetterOut]:
        return backend.dead_letters(_known(queue), limit)

    async def _on_dead(
        act: Callable[[str, list[str] | None], int],
        queue: str,
        request: Request[Any, Any, Any],
    ) -> Count:
        """``act`` (requeue, purge) on the dead letters of ``queue`` whose
        ids the body lists (all of them if it is empty); how many."""
        _known(queue)
        ids: list[str] | None = None
        body = await request.body()
        if body.strip():
            try:
                ids = validate.parse(body, DeadLetterIds).ids
            except validate.Invalid as bad:
                raise (BadBody if bad.status == 400 else BadValue)(extra=bad.reasons) from None
        return Count(await _thread(act, queue, ids))

    @post(
        "/queues/{queue:str}/dead/requeue",
        status_code=200,
        summary="Put dead letters back on their queue (admin)",
        raises=[NoSuchQueue, BadValue, *ADMIN_ERRORS],
        tags=["queues"],
        opt={"scope": "admin"},
    )
    async def requeue(
        queue: Annotated[str, Parameter(description="queue name")], request: Request[Any, Any, Any]
    ) -> Count:
        return await _on_dead(backend.requeue, queue, request)

    @post(
        "/queues/{queue:str}/dead/purge",
        status_code=200,
        summary="Delete dead letters (admin)",
        raises=[NoSuchQueue, BadValue, *ADMIN_ERRORS],
        tags=["queues"],
        opt={"scope": "admin"},
    )
    async def purge(
        queue: Annotated[str, Parameter(description="queue name")], request: Request[Any, Any, Any]
    ) -> Count:
        return await _on_dead(backend.purge, queue, request)

    # -- health and metrics ------------------------------------------------------------

    def broker_check() -> None:
        names = app.queue_names()
        if names:
            backend.queue_infos(names[:1])

    def workers_seen() -> list[WorkerRecord]:
        horizon = int(time.time() * 1000 - config.worker_window * 1000)
        return [w for w in backend.store(lambda s: s.workers()) if w.last_seen >= horizon]

    @get(
        "/health",
        summary="Broker reachable, workers seen (no token needed)",
        opt={"scope": "public"},
        tags=["monitoring"],
        responses={503: _spec(Health, "the broker is unreachable")},
    )
    async def health() -> Response[Health]:
        broker, detail = False, ""
        with anyio.move_on_after(config.health_timeout):
            try:
                await _thread(broker_check)
                broker = True
            except Exception as e:
                detail = f"broker unreachable: {type(e).__name__}"
        if not broker and not detail:
            detail = f"broker did not answer within {config.health_timeout:g} s"
        seen: list[WorkerRecord] = []
        with anyio.move_on_after(config.health_timeout):
            try:
                seen = await _thread(workers_seen)
            except Exception as e:
                detail = detail or f"task store unreadable: {type(e).__name__}"
        h = Health("ok" if broker else "unavailable", broker, seen, detail)
        return Response(
            h, status_code=200 if broker else 503, headers={"Cache-Control": "no-cache"}
        )

    @get(
        "/metrics",
        summary="Prometheus metrics",
        raises=AUTH_ERRORS,
        tags=["monitoring"],
        media_type="text/plain; version=0.0.4",
        sync_to_thread=True,
    )
    def metrics() -> Response[bytes]:
        return Response(_render_metrics(), media_type="text/plain; version=0.0.4")

    # -- application ----------------------------------------------------------------------

    from kew.web.page import page_routes

    handlers: list[Any] = [submit_route(name) for name in sorted(app.queues)]
    handlers += [
        submit_unknown,
        recent_tasks,
        task_status,
        task_output,
        queues,
        dead_letters,
        requeue,
        purge,
        health,
        metrics,
        *page_routes(backend, config, sessions),
        *routes,
    ]
    components = Components(
        security_schemes={
            "bearer": SecurityScheme(type="http", scheme="bearer", description="read or admin")
        },
    )

    def on_shutdown() -> None:
        backend.close()

    def on_startup(asgi: Litestar) -> None:
        _complete_openapi(asgi, app)

    return Litestar(
        route_handlers=handlers,
        guards=[guard],
        exception_handlers={LoginRequired: _to_login, HTTPException: _problem},
        request_max_body_size=config.max_body_bytes,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        openapi_config=OpenAPIConfig(
            title=f"{config.title} task API",
            version="1",
            path="/schema",
            components=components,
            render_plugins=[SwaggerRenderPlugin()],
        ),
    )


def _to_login(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    from litestar.response import Redirect

    return Redirect("/ui/login")


def _problem(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Errors as JSON whatever the route's own media type (Litestar's shape:
    status_code, detail, extra)."""
    body: dict[str, Any] = {"status_code": exc.status_code, "detail": exc.detail}
    if exc.extra:
        body["extra"] = exc.extra
    return Response(
        body, status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


def _spec(tp: Any, description: str) -> Any:
    from litestar.openapi.datastructures import ResponseSpec

    return ResponseSpec(data_container=tp, description=description)


def _schema_name(tp: Any) -> str:
    _, components = msgspec.json.schema_components([tp], ref_template="{name}")
    refs = msgspec.json.schema_components([tp], ref_template="{name}")[0][0]
    name = refs.get("$ref")
    if isinstance(name, str) and name in components:
        return name
    return f"Task_{getattr(tp, '__name__', 'body')}"


def _complete_openapi(asgi: Litestar, app: TaskApp) -> None:
    """Add the request bodies Litestar cannot see (the submit routes read
    the raw body to report every validation error; the dead-letter routes
    take an optional one), with the task types' JSON schemas."""
    doc = asgi.openapi_schema
    schemas = doc.components.schemas
    schemas.update(_schemas([tq.type for tq in app.queues.values()] + [DeadLetterIds]))

    def body(name: str, required: bool, description: str) -> RequestBody:
        ref = Reference(ref=f"#/components/schemas/{name}")
        return RequestBody(
            content={"application/json": OpenAPIMediaType(schema=ref)},
            required=required,
            description=description,
        )

    paths = doc.paths or {}
    for path, path_item in paths.items():  # every operation needs a token but /health
        ops = (path_item.get, path_item.post, path_item.delete, path_item.head)
        for op in ops:
            if op is not None and path != "/health":
                op.security = [{"bearer": []}]
    for name, tq in app.queues.items():
        item = paths.get(f"/queues/{name}/tasks")
        if item is not None and item.post is not None:
            item.post.request_body = body(_schema_name(tq.type), True, "the task, validated")
    for action in ("requeue", "purge"):
        item = paths.get(f"/queues/{{queue}}/dead/{action}")
        if item is not None and item.post is not None:
            item.post.request_body = body(
                "DeadLetterIds", False, "which dead letters (all when there is no body)"
            )


def _schemas(types: Sequence[Any]) -> dict[str, Any]:
    """JSON schemas of the task types, as OpenAPI components (raw dicts:
    Litestar passes them through into the document)."""
    out: dict[str, Any] = {}
    for tp in types:
        (top,), components = msgspec.json.schema_components(
            [tp], ref_template="#/components/schemas/{name}"
        )
        out.update(components)
        if "$ref" not in top:
            out[_schema_name(tp)] = top
    return out


def _output(task_id: str, offset: int, store: Any) -> tuple[str, int]:
    text, nxt = store.output(task_id, offset)
    return str(text), int(nxt)


def _op_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _render_metrics() -> bytes:
    try:
        from kew.task import metrics as task_metrics

        render = getattr(task_metrics, "render", None)
        if render is not None:
            return bytes(render())
    except ImportError:
        pass
    import prometheus_client

    return bytes(prometheus_client.generate_latest())
