"""The running task's context: ``kew.task.current()`` inside a handler.

    from kew.task import current

    def handle(job: Job) -> None:
        ctx = current()
        ctx.log(f"attempt {ctx.attempt} of task {ctx.id}")

A long handler checks ``current().cancelled`` (a :class:`threading.Event`)
now and then and returns when it is set: the task was cancelled
(``kew task cancel ID``, ``POST /tasks/{id}/cancel``) or its worker is
stopping::

    while not ctx.cancelled.is_set():
        step()

What a handler logs goes to the task's output (readable through the store
with ``App.output`` / ``kew task ID``).  It is buffered and sent as task
events at most every ~0.2 s (or per 32 KiB), and at the end of the attempt
before its status, so logging a line costs no round trip.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kew.task.model import EventKind, TaskEvent

__all__ = ["TaskContext", "current"]

#: Output buffered beyond this many characters is sent at once.
FLUSH_CHARS = 32 * 1024
#: Buffered output and a pending "running" status older than this are sent
#: by the app's flusher.
FLUSH_INTERVAL = 0.2

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("kew_task_context")

Emit = Callable[[Sequence[TaskEvent]], None]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Cancelled(threading.Event):
    """``TaskContext.cancelled``: an Event that also calls the hooks given
    to :meth:`TaskContext.on_cancel` once it is set."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._lock = lock
        self._hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        with self._lock:
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


class TaskContext:
    """One run of one attempt of a task.

    ``id`` is the task id (the message id), ``queue`` its queue,
    ``attempt`` 1 for the first attempt, ``worker`` the worker's id,
    ``data`` the task's value.  ``cancelled`` (a :class:`threading.Event`)
    is set when the task is cancelled on request (then
    :attr:`cancel_requested` is True too, and the attempt ends ``cancelled``
    however the handler returns) or when the worker hands the task back
    (shutdown past its grace period): a long handler may check it and return
    early; command tasks kill their process group.
    """

    def __init__(
        self,
        id: str,
        queue: str,
        attempt: int,
        *,
        worker: str = "",
        data: Any = None,
        emit: Emit | None = None,
        run: int | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.attempt = attempt
        self.worker = worker
        self.data = data
        self.run = run if run is not None else _now_ms()
        self._lock = threading.Lock()
        self.cancelled: threading.Event = _Cancelled(self._lock)
        #: True once a cancel was asked for (see :meth:`request_cancel`).
        self.cancel_requested = False
        #: True once the worker handed the attempt back (set before any of
        #: the attempts handed back together is cancelled).
        self.handed_back = False
        self.started = time.monotonic()
        self._emit = emit
        self._chunks: list[str] = []
        self._size = 0
        self._seq = 0
        self._pending: list[TaskEvent] = []
        self._abandoned = False

    def __repr__(self) -> str:
        return f"TaskContext(id={self.id!r}, queue={self.queue!r}, attempt={self.attempt})"

    def request_cancel(self) -> bool:
        """The task was cancelled on request: set :attr:`cancel_requested` and
        :attr:`cancelled`.  True the first time (False when it was already)."""
        with self._lock:
            first = not self.cancel_requested
            self.cancel_requested = True
        self.cancelled.set()
        return first

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (once, on the thread that sets it) when
        :attr:`cancelled` is set, or now if it is.  For the runner (an
        async handler's coroutine is cancelled so)."""
        cancelled = self.cancelled
        assert isinstance(cancelled, _Cancelled)
        with self._lock:
            if not cancelled.is_set():
                cancelled._hooks.append(hook)
                return
        hook()

    # -- output ---------------------------------------------------------------

    def log(self, text: str) -> None:
        """Append ``text`` as a line (a newline is added if missing) to the
        task's output."""
        self.write(text if text.endswith("\n") else text + "\n")

    def write(self, text: str) -> None:
        """Append ``text`` as it is to the task's output."""
        if not text:
            return
        with self._lock:
            self._chunks.append(text)
            self._size += len(text)
            full = self._size >= FLUSH_CHARS
        if full:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered now (output, and a pending status)."""
        events = self.take()
        if events and self._emit is not None:
            self._emit(events)

    # -- for the runner -------------------------------------------------------

    def event(self, kind: EventKind, at: int | None = None, **fields: Any) -> TaskEvent:
        """A :class:`~kew.task.TaskEvent` of this run (its task, attempt, run and worker),
        at ``at`` (epoch ms, default now), with ``fields``.  For the runner."""
        return TaskEvent(
            self.id,
            self.queue,
            kind,
            _now_ms() if at is None else at,
            attempt=self.attempt,
            run=self.run,
            worker=self.worker,
            **fields,
        )

    def add_pending(self, event: TaskEvent) -> None:
        """Queue a status event to be sent with the next flush, before the buffered
        output.  For the runner."""
        with self._lock:
            self._pending.append(event)

    def take(self) -> list[TaskEvent]:
        """Everything not yet sent, in order: pending status events, then
        the buffered output as one chunk."""
        with self._lock:
            events = self._pending
            self._pending = []
            if self._chunks:
                text = "".join(self._chunks)
                self._chunks = []
                self._size = 0
                events.append(
                    TaskEvent(
                        self.id,
                        self.queue,
                        "output",
                        _now_ms(),
                        attempt=self.attempt,
                        run=self.run,
                        seq=self._seq,
                        worker=self.worker,
                        text=text,
                    )
                )
                self._seq += 1
        return events

    def put_back(self, events: Sequence[TaskEvent]) -> None:
        """Events :meth:`take` gave that could not be sent: sent next time."""
        with self._lock:
            self._pending[:0] = events

    def due(self, now: float) -> bool:
        """Has this run something to send that waited long enough?"""
        with self._lock:
            waiting = bool(self._pending or self._chunks)
        return waiting and now - self.started >= FLUSH_INTERVAL


def current() -> TaskContext:
    """The context of the task this thread runs; raises outside a task."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "kew.task.current() was called outside a task: only a task handler "
            "(run by a worker, or called through its TaskQueue) has a task context"
        ) from None


def set_current(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(ctx)


def reset_current(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)
