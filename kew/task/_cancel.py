"""Cancelling a task, queued or running, from any process on any host.

The cancel travels as messages, never as a local signal (docs/tasks.md,
"Cancel"):

* **the canceller** (:func:`cancel_task`: ``App.cancel``, ``kew task cancel``;
  :func:`cancel_task_async`: ``App.cancel_async``, ``POST /tasks/{id}/cancel``)
  reads the task's record in the store; a final task is left alone.
  Otherwise it marks the task in the store at once (a
  ``cancel-requested`` event applied there, and sent on the events queue for
  the recorders), then sends a :class:`Control` message to the control queue
  of every worker the store saw alive (a heartbeat within :data:`LIVE_MS`);
* **every worker** consumes its own control queue,
  ``<app>.control.<worker id>`` (:func:`control_queue_name`; declared at
  start, deleted at a graceful stop).  A cancel goes into the app's
  :class:`CancelSet` (ids kept :data:`CANCEL_TTL` seconds, at most
  :data:`CANCEL_MOST`) and stops the attempts of those tasks running there;
  an attempt checks the set before it starts, so a task fetched later (or
  waiting in the worker's prefetch) ends ``cancelled`` without running;
* **a worker that never got the message** (it started after the cancel was
  sent, or its first heartbeat was not recorded yet) reads the store's
  cancel marks (:meth:`~kew.task.store.TaskStore.cancel_marks`) before it
  takes any task and again with every heartbeat, when it can read the store
  the canceller marked (:class:`Controls`).

Package-internal: ``App.cancel``, ``App.cancel_async`` and the worker use it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

import msgspec

import kew.aio
from kew.qchan import Queue, Subscription
from kew.qchan.spi import now_ms
from kew.qchan.spi.aio import AsyncConnector
from kew.task.model import EventMessage, TaskEvent, TaskRecord, TaskStatus, WorkerRecord
from kew.task.store import TaskStore

if TYPE_CHECKING:
    from kew.task.app import App
    from kew.task.context import TaskContext

__all__ = [
    "CANCEL_MOST",
    "CANCEL_TTL",
    "LIVE_MS",
    "CancelResult",
    "CancelSet",
    "Control",
    "Controls",
    "StoreRunner",
    "cancel_task",
    "cancel_task_async",
    "control_queue_name",
    "stop_running",
]

log = logging.getLogger("kew.task")

#: Seconds a worker remembers a cancelled task id (and how far back it reads
#: the store's cancel marks).
CANCEL_TTL = 86_400.0
#: Cancelled task ids a worker remembers at most (the oldest are forgotten first).
CANCEL_MOST = 100_000
#: A worker whose heartbeat the store got within this many ms is told of a cancel.
LIVE_MS = 30_000

R = TypeVar("R")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def control_queue_name(app_name: str, worker_id: str) -> str:
    """``<app>.control.<worker id>``, with what a queue name cannot hold
    (the ``:`` of ``host:pid:random``) as ``-``."""
    return _UNSAFE.sub("-", f"{app_name}.control.{worker_id}")[:200]


class Control(msgspec.Struct, frozen=True, omit_defaults=True):
    """A message on a worker's control queue: ``cancel`` the tasks
    ``task_ids``, asked at ``at`` (epoch ms) by ``by`` (who, for the logs)."""

    kind: Literal["cancel"]
    task_ids: list[str]
    at: int
    by: str = ""


class CancelResult(msgspec.Struct, frozen=True):
    """What a cancel did.

    ``cancelled``: the task is or will be ``cancelled`` (asked now or before,
    or cancelled already); False when it had ended otherwise (``succeeded``,
    ``failed``): nothing was done.  ``status``: the task's status in the
    store when asked (a running task shows ``running`` until its worker
    stops it).  ``workers``: how many live workers were sent the cancel.
    """

    id: str
    cancelled: bool
    status: TaskStatus
    detail: str
    workers: int = 0


class CancelSet:
    """Task ids cancelled, each remembered ``ttl`` seconds, at most ``most``
    (the oldest forgotten first).  Thread-safe."""

    def __init__(self, ttl: float = CANCEL_TTL, most: int = CANCEL_MOST) -> None:
        self.ttl = ttl
        self.most = most
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> forgotten at (monotonic)

    def add(self, ids: Iterable[str]) -> list[str]:
        """Remember ``ids``; the ones that were not remembered already."""
        now = time.monotonic()
        new: list[str] = []
        with self._lock:
            while self._ids and next(iter(self._ids.values())) < now:
                self._ids.popitem(last=False)
            for task_id in ids:
                if task_id not in self._ids:
                    new.append(task_id)
                    self._ids[task_id] = now + self.ttl
            while len(self._ids) > self.most:
                self._ids.popitem(last=False)
        return new

    def __contains__(self, task_id: object) -> bool:
        with self._lock:
            until = self._ids.get(task_id) if isinstance(task_id, str) else None
        return until is not None and until >= time.monotonic()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


def stop_running(app: App, task_ids: Iterable[str], by: str = "") -> list[TaskContext]:
    """Remember ``task_ids`` as cancelled in ``app`` and stop their attempts
    running in this process (their ``cancelled`` flag; a command task's
    process group is killed); the attempts stopped now."""
    ids = set(task_ids)
    app.cancels.add(ids)
    stopped = [c for c in app.running.active() if c.id in ids and c.request_cancel()]
    for ctx in stopped:
        log.info(
            "kew: %s: task %s cancelled%s: stopping attempt %s",
            ctx.queue,
            ctx.id,
            f" by {by}" if by else "",
            ctx.attempt,
        )
    return stopped


def _tell(app: App, workers: list[str], message: Control) -> int:
    """Send ``message`` to the control queue of each of ``workers``; how
    many took it.  The queues are not declared here: a worker that has
    stopped since its last heartbeat deleted its own."""
    told = 0
    for worker in workers:
        name = control_queue_name(app.name, worker)
        queue = Queue(app.connector, name, Control)
        try:
            producer = app.connector.producer(name)
            try:
                producer.send(queue.message(message))
            finally:
                producer.close()
            told += 1
        except Exception as e:
            log.warning("kew: cannot send a cancel to worker %s (%s): %s", worker, name, e)
    return told


def _to_cancel(task_id: str, rec: TaskRecord | None) -> TaskRecord | CancelResult:
    """``rec``, or the answer for a task with nothing left to cancel; raises
    KeyError for a task the store has never heard of."""
    if rec is None:
        raise KeyError(task_id)
    if rec.status == "cancelled":
        return CancelResult(task_id, True, rec.status, f"task {task_id} is cancelled already")
    if rec.final:
        return CancelResult(
            task_id, False, rec.status, f"task {task_id} {rec.status} already: nothing to cancel"
        )
    return rec


def _live(workers: Iterable[WorkerRecord], at: int) -> list[str]:
    return sorted(w.id for w in workers if at - w.last_seen <= LIVE_MS)


def _asked(task_id: str, rec: TaskRecord, by: str, told: int) -> CancelResult:
    """Logged, and the answer, once the cancel is asked."""
    log.info(
        "kew: cancel of task %s (%s) asked%s; %d live worker(s) told",
        task_id,
        rec.status,
        f" by {by}" if by else "",
        told,
    )
    what = "asked again" if rec.cancel_requested_at is not None else "asked"
    when = "when a worker takes it" if rec.status != "running" else "when its worker stops it"
    return CancelResult(
        task_id,
        True,
        rec.status,
        f"cancel of task {task_id} ({rec.status}) {what}: it ends cancelled {when}",
        told,
    )


def cancel_task(
    app: App, task_id: str, *, by: str = "", store: TaskStore | None = None
) -> CancelResult:
    """Cancel the task ``task_id`` of ``app`` (see the module); ``store``:
    where its record is (default ``app.store``).  Raises KeyError when the
    store has never heard of the task.  Idempotent: a second cancel changes
    nothing (it sends the messages again, for a worker that missed them)."""
    store = app.store if store is None else store
    rec = _to_cancel(task_id, store.get(task_id))
    if isinstance(rec, CancelResult):
        return rec
    at = now_ms()
    event = TaskEvent(task_id, rec.queue, "cancel-requested", at, text=by)
    store.apply([event])  # the mark, at once: workers read it
    try:
        app.emitter.emit([event])  # and for the recorders (another store)
    except Exception as e:
        log.warning("kew: cannot send the cancel-requested event of task %s: %s", task_id, e)
    live = _live(store.workers(), at)
    told = _tell(app, live, Control("cancel", [task_id], at, by))
    return _asked(task_id, rec, by, told)


class StoreRunner(Protocol):
    """Runs ``fn(store)`` off the event loop and awaits it (a task store is
    a sync API): kew.web's store thread (``Backend.on_store``), or
    ``App.cancel_async``'s default, a thread of the loop's executor."""

    def __call__(self, fn: Callable[[Any], R], /) -> Awaitable[R]: ...


def _in_executor(store: Callable[[], TaskStore]) -> StoreRunner:
    """``fn(store())`` in a thread of the loop's executor (``store()`` too:
    an app opens its store on first use)."""

    async def run(fn: Callable[[Any], R], /) -> R:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(store()))

    return run


async def _emit_async(app: App, conn: AsyncConnector, event: TaskEvent) -> None:
    """``event`` to the app's events queue with the async API."""
    if not app.emitter.enabled:
        return
    events = app.events
    queue: kew.aio.Queue[EventMessage] = kew.aio.Queue(
        conn,
        events.name,
        cast("type[EventMessage]", EventMessage),
        max_depth=events.max_depth,
    )
    try:
        await queue.send([event])
    finally:
        await queue.close()


async def _tell_one(conn: AsyncConnector, app_name: str, worker: str, message: Control) -> bool:
    name = control_queue_name(app_name, worker)
    queue = kew.aio.Queue(conn, name, Control)
    try:
        producer = await conn.producer(name)  # (not declared: see _tell)
        try:
            await producer.send(queue.message(message))
        finally:
            await producer.close()
    except Exception as e:
        log.warning("kew: cannot send a cancel to worker %s (%s): %s", worker, name, e)
        return False
    return True


async def _tell_async(app: App, conn: AsyncConnector, workers: list[str], message: Control) -> int:
    """:func:`_tell` with the async API, to every worker at once."""
    sent = await asyncio.gather(*(_tell_one(conn, app.name, w, message) for w in workers))
    return sum(sent)


def _mark(event: TaskEvent, store: TaskStore) -> list[WorkerRecord]:
    """The cancel mark applied, then the workers the store knows (one trip)."""
    store.apply([event])
    return list(store.workers())


async def cancel_task_async(
    app: App,
    task_id: str,
    *,
    by: str = "",
    store: TaskStore | None = None,
    on_store: StoreRunner | None = None,
    connector: AsyncConnector | None = None,
) -> CancelResult:
    """:func:`cancel_task` for a coroutine, with the same steps and answer:
    the store read and written by ``on_store`` (default: a thread of the
    loop's executor, on ``store``, default ``app.store``), the event and
    the control messages sent with the async API on ``connector`` (default:
    the app's async connector, the one ``submit_async`` uses)."""
    if on_store is None:
        given = store
        on_store = _in_executor(lambda: app.store if given is None else given)
    if connector is None:
        from kew.task._submit import submitter

        connector = submitter(app)._async_connector()
    found: TaskRecord | None = await on_store(lambda s: s.get(task_id))
    rec = _to_cancel(task_id, found)
    if isinstance(rec, CancelResult):
        return rec
    at = now_ms()
    event = TaskEvent(task_id, rec.queue, "cancel-requested", at, text=by)
    workers = await on_store(lambda s: _mark(event, s))  # the mark, at once
    try:
        await _emit_async(app, connector, event)  # and for the recorders
    except Exception as e:
        log.warning("kew: cannot send the cancel-requested event of task %s: %s", task_id, e)
    message = Control("cancel", [task_id], at, by)
    told = await _tell_async(app, connector, _live(workers, at), message)
    return _asked(task_id, rec, by, told)


class Controls:
    """A worker's control queue and the store's cancel marks.

    :meth:`start` reads the marks (``read_store``), then consumes the
    control queue and reads the marks again every ``interval`` seconds on a
    thread of its own (a slow store does not hold up the heartbeats);
    :meth:`stop` stops both and deletes the queue."""

    def __init__(
        self, app: App, worker_id: str, *, read_store: bool, interval: float = 5.0
    ) -> None:
        self.app = app
        self.worker_id = worker_id
        self.read_store = read_store
        self.interval = interval
        self.queue: Queue[Control] = Queue(
            app.connector, control_queue_name(app.name, worker_id), Control
        )
        self.subscription: Subscription | None = None
        self._store_failed = False
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self) -> Controls:
        self.poll()
        self.subscription = self.queue.sink(self._on_message)
        if self.read_store:
            self._poller = threading.Thread(
                target=self._poll_loop, name="kew-cancel-marks", daemon=True
            )
            self._poller.start()
        return self

    def _on_message(self, message: Control) -> None:
        if message.kind == "cancel":
            stop_running(self.app, message.task_ids, message.by)

    def _poll_loop(self) -> None:
        while not self._stopping.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Read the store's cancel marks of the last :data:`CANCEL_TTL`
        seconds (a store that fails is logged, once until it works again)."""
        if not self.read_store:
            return
        try:
            ids = self.app.store.cancel_marks(now_ms() - int(CANCEL_TTL * 1000))
        except Exception as e:
            if not self._store_failed:
                log.warning(
                    "kew worker %s: cannot read the cancel marks of the task store: %s",
                    self.worker_id,
                    e,
                )
            self._store_failed = True
            return
        self._store_failed = False
        if ids:
            stop_running(self.app, ids)

    def stop(self, grace: float = 5.0) -> None:
        """Stop consuming and reading the marks, and delete the control queue."""
        self._stopping.set()
        if self.subscription is not None:
            self.subscription.stop(grace)
        try:
            self.app.connector.delete(self.queue.name)
        except Exception as e:
            log.warning("kew worker %s: cannot delete %s: %s", self.worker_id, self.queue.name, e)
        self.queue.close()
