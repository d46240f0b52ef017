"""Task routes: submit a task to a served queue (one route per queue, with
its own operation and, in the OpenAPI document, its task type's schema),
recent tasks, a task's status, its output, streamed, and cancelling it
(``admin``; logged at INFO by ``kew.web.audit`` with who asked)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter
from litestar.response import Stream

from kew.qchan.codec import DecodeError
from kew.qchan.spi import BrokerUnavailable, MessageTooLarge, QueueFull, now_ms
from kew.task import CancelResult
from kew.task.model import FINAL_STATUSES, TaskEvent, TaskRecord, TaskStatus
from kew.web import validate
from kew.web._errors import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    BadValue,
    NoSuchQueue,
    TooLarge,
    Unavailable,
    invalid,
)
from kew.web._state import audited, identity, web_state
from kew.web.backend import Backend
from kew.web.search import TaskQuery, search_tasks, to_ms

log = logging.getLogger("kew.web")

#: Seconds between two looks at a followed task's output.
OUTPUT_POLL = 0.25
#: The longest ``delay`` a submission may ask for (seconds).
MAX_DELAY = 366 * 86400.0


class Submitted(msgspec.Struct, frozen=True):
    """A task accepted: poll ``status_url``; ``output_url`` streams its output."""

    id: str
    status: Literal["queued"]
    status_url: str
    output_url: str


# -- submit ---------------------------------------------------------------------


async def _submit(backend: Backend, name: str, body: bytes, delay: float | None) -> str:
    tq = backend.app.queues[name]
    try:
        data = tq.decode_json(body)
    except DecodeError as e:
        try:
            validate.parse(body, tq.type)
        except validate.Invalid as bad:
            raise invalid(bad) from None
        raise BadValue(extra=[str(e)]) from None
    task_id = str(await tq.submit_async(data, delay=delay))
    if getattr(tq, "track", True):
        # The queued event travels to the recorder too; recording it
        # here as well (idempotent) means the status URL answers at once.
        at = now_ms()
        next_at = at + round(delay * 1000) if delay else None
        event = TaskEvent(task_id, name, "queued", at, next_at=next_at)
        try:
            await backend.store.record(event)
        except Exception:
            log.warning("kew.web: could not record task %s as queued", task_id)
    return task_id


async def submit(
    request: Request[Any, Any, Any],
    state: State,
    delay: Annotated[
        float | None,
        Parameter(ge=0, le=MAX_DELAY, description="seconds before the task may run"),
    ] = None,
) -> Response[Submitted]:
    """Submit the body as a task to the route's queue (its ``opt["queue"]``)."""
    name: str = request.route_handler.opt["queue"]
    body = await request.body()
    try:
        task_id = await _submit(web_state(state).backend, name, body, delay)
    except MessageTooLarge as e:
        raise TooLarge(detail=str(e)) from None
    except (QueueFull, BrokerUnavailable) as e:
        raise Unavailable(detail=str(e), headers={"Retry-After": "5"}) from None
    base = str(request.base_url).rstrip("/")  # with the root path
    status_url = f"{base}/tasks/{task_id}"
    return Response(
        Submitted(task_id, "queued", status_url, f"{status_url}/output"),
        status_code=202,
        headers={"Location": status_url},
    )


def _op_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def submit_route(name: str) -> HTTPRouteHandler:
    """The route submitting tasks to the app's task queue ``name``."""
    return post(
        f"/queues/{name}/tasks",
        status_code=202,
        summary=f"Submit a task to {name}",
        operation_id=f"submit_{_op_name(name)}",
        raises=[BadValue, TooLarge, Unavailable, *AUTH_ERRORS],
        tags=["tasks"],
        opt={"queue": name},
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
    """404 for a queue name without a route of its own."""
    raise NoSuchQueue(detail=f"no task queue named {queue!r}")


# -- tasks ------------------------------------------------------------------------


@get(
    "/tasks",
    summary="Tasks, newest first: recent, or found by filters",
    description="Every filter given must match; repeat `queue` or `status` for several "
    "values (any of them). `since`/`until` bound the creation time (ISO 8601, UTC when it "
    "has no offset; `since` included, `until` excluded); `error` is a case-insensitive "
    "substring of the last error; `worker` a worker id. Page with `offset` (a page shorter "
    "than `limit` is the last).",
    raises=AUTH_ERRORS,
    tags=["tasks"],
)
async def recent_tasks(
    state: State,
    limit: int = Parameter(default=50, ge=1, le=1000, description="at most this many"),
    offset: int = Parameter(default=0, ge=0, le=1_000_000, description="skip this many first"),
    queue: Annotated[
        list[str] | None, Parameter(max_items=50, description="only tasks of these queues")
    ] = None,
    status: Annotated[
        list[TaskStatus] | None,
        Parameter(max_items=6, description="only tasks with one of these statuses"),
    ] = None,
    since: Annotated[dt.datetime | None, Parameter(description="created at or after")] = None,
    until: Annotated[dt.datetime | None, Parameter(description="created before")] = None,
    error: Annotated[
        str | None,
        Parameter(max_length=500, description="the last error contains this (any case)"),
    ] = None,
    worker: Annotated[
        str | None, Parameter(max_length=300, description="ran (or runs) on this worker")
    ] = None,
) -> list[TaskRecord]:
    """The latest ``limit`` tasks after ``offset`` that every given filter selects."""
    try:
        q = TaskQuery(
            queues=tuple(queue or ()),
            statuses=tuple(status or ()),
            since=to_ms(since),
            until=to_ms(until),
            error=error or "",
            worker=worker or "",
            limit=limit,
            offset=offset,
        )
    except ValueError as e:
        raise ValidationException(detail=str(e)) from None
    return await web_state(state).backend.on_store(lambda s: search_tasks(s, q))


async def task_record(backend: Backend, task_id: str) -> TaskRecord:
    """The task's record; NotFoundException when the store has never heard of it."""
    rec: TaskRecord | None = await backend.on_store(lambda s: s.get(task_id))
    if rec is None:
        raise NotFoundException(detail=f"no task {task_id!r}")
    return rec


@get(
    "/tasks/{task_id:str}",
    summary="A task's status",
    raises=[NotFoundException, *AUTH_ERRORS],
    tags=["tasks"],
)
async def task_status(
    state: State, task_id: Annotated[str, Parameter(description="task id")]
) -> TaskRecord:
    """A task's record in the store."""
    return await task_record(web_state(state).backend, task_id)


def _output(task_id: str, offset: int, store: Any) -> tuple[str, int, TaskRecord | None]:
    """The output from ``offset``, the offset after it, and the record then."""
    text, nxt = store.output(task_id, offset)
    return str(text), int(nxt), store.get(task_id)


async def _chunks(
    backend: Backend, task_id: str, follow: bool, timeout: float
) -> AsyncIterator[str]:
    """A task's output from the start; while ``follow``, what comes next
    until the task is final (and a little after) or ``timeout`` seconds."""
    offset = 0
    deadline = time.monotonic() + timeout
    final_seen = 0
    while True:
        text, offset, rec = await backend.on_store(partial(_output, task_id, offset))
        if text:
            yield text
        if not follow or time.monotonic() > deadline:
            return
        if rec is None or rec.status in FINAL_STATUSES:
            final_seen += 1
            if final_seen > 2 and not text:  # chunks recorded after the final event
                return
        await asyncio.sleep(OUTPUT_POLL)


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
    state: State,
    task_id: Annotated[str, Parameter(description="task id")],
    follow: Annotated[bool, Parameter(description="follow until final")] = True,
) -> Stream:
    """A task's output as a text stream (404 for an unknown task)."""
    web = web_state(state)
    await task_record(web.backend, task_id)
    return Stream(
        _chunks(web.backend, task_id, follow, web.config.follow_timeout),
        media_type="text/plain",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- cancel -----------------------------------------------------------------------


async def ask_cancel(backend: Backend, task_id: str, by: str) -> CancelResult:
    """Cancel ``task_id`` with ``App.cancel_async``: the store read and
    written on the store's thread, the event and the cancel messages sent on
    the web's async connector; NotFoundException when the store has never
    heard of it.  (An app with only a sync ``cancel``: that, on the store's
    thread.)"""
    app = backend.app
    cancel_async = getattr(app, "cancel_async", None)
    cancel = getattr(app, "cancel", None)
    try:
        if callable(cancel_async):
            result: CancelResult = await cancel_async(
                task_id, by=by, on_store=backend.on_store, connector=backend.broker.connector
            )
        elif callable(cancel):
            result = await backend.on_store(lambda s: cancel(task_id, by=by, store=s))
        else:
            raise NotFoundException(detail="this app cannot cancel tasks")
    except KeyError:
        raise NotFoundException(detail=f"no task {task_id!r}") from None
    return result


@post(
    "/tasks/{task_id:str}/cancel",
    status_code=200,
    summary="Cancel a task, queued or running (admin)",
    description="A queued task never runs; a running one is told to stop (a command "
    "task's process group is killed) by its worker, wherever it runs: the task ends "
    "`cancelled`, its output kept. The answer is 200 whatever the task's state: "
    "`cancelled` is true when the task is or will be cancelled (asked now or before, "
    "or cancelled already: asking twice is asking once), false when it had ended "
    "otherwise (`succeeded`, `failed`: nothing is done); `status` is its status when "
    "asked. 404 for a task the store has never heard of.",
    raises=[NotFoundException, *ADMIN_ERRORS],
    tags=["tasks"],
    opt={"scope": "admin"},
)
async def cancel_task(
    task_id: Annotated[str, Parameter(description="task id")],
    request: Request[Any, Any, Any],
) -> CancelResult:
    """Cancel the task ``task_id``."""
    backend = web_state(request.app.state).backend
    who = identity(request)
    result = await audited(
        request,
        ask_cancel(backend, task_id, str(who) if who else ""),
        lambda r: f"asked to cancel task {task_id!r} via API: {r.detail}",
    )
    return result


def task_routes(queues: Iterable[str]) -> list[HTTPRouteHandler]:
    """The task routes, with a submit route for each of ``queues``."""
    return [
        *(submit_route(name) for name in queues),
        submit_unknown,
        recent_tasks,
        task_status,
        task_output,
        cancel_task,
    ]
