"""The task layer's entry point: an :class:`App` declares task queues.

    import kew.task

    app = kew.task.App("redis://127.0.0.1:6379/0")

    @app.task(retry=kew.task.Intervals.minutes(10, 10, 120))
    def thumbnail(job: Thumbnail) -> None:
        kew.task.current().log(f"rendering {job.image_id}")
        ...

    task_id = thumbnail.submit(Thumbnail(image_id=1))   # from anywhere
    # kew worker mymodule:app    runs it; kew task <id> shows it

An App is a registry (its task queues, its extra consumers), a connector, a
task store, and the entry points that run them (:meth:`App.worker`,
:meth:`App.recorder`).  How an attempt runs is in ``kew.task._attempt``
(:class:`~kew.task.TaskQueue`); task events, the attempts running in this
process and the recorder are in ``kew.task._events``.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from kew.connect import connect
from kew.qchan import Queue, Subscription
from kew.qchan._message import check_sync
from kew.qchan.codec import Codec
from kew.qchan.spi import Connector
from kew.qchan.spi.aio import AsyncConnector
from kew.task._async_run import EventLoopThread
from kew.task._attempt import TaskQueue
from kew.task._cancel import CancelResult, CancelSet, StoreRunner, cancel_task, cancel_task_async
from kew.task._events import Emitter, Recorder, Running
from kew.task._follow import follow_output
from kew.task.command import CommandSpec, ExitAction, check_result, run_command
from kew.task.context import TaskContext
from kew.task.model import EventMessage, TaskEvent, TaskRecord
from kew.task.retry import RetryPolicy
from kew.task.store import TaskStore, open_store

if TYPE_CHECKING:
    from kew.task.worker import Worker

__all__ = ["DEFAULT_STORE", "App", "TaskQueue"]

T = TypeVar("T")

DEFAULT_STORE = "sqlite:///kew-tasks.sqlite3"
"""Where task status and output are kept when ``App(store=...)`` is not
given."""


# -- the app ----------------------------------------------------------------------


def _first_param_type(fn: Callable[..., object]) -> Any:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise TypeError(f"cannot read the signature of {fn!r}") from None
    if not params:
        raise TypeError(
            f"task handler {getattr(fn, '__name__', fn)!r} takes no parameter: it must take "
            "the task's value as its first one"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise TypeError(
            f"cannot resolve the annotations of task handler {getattr(fn, '__name__', fn)!r}: {e}"
        ) from None
    tp = hints.get(params[0].name)
    if tp is None:
        raise TypeError(
            f"task handler {getattr(fn, '__name__', fn)!r}: annotate its first parameter "
            f"({params[0].name!r}) with the task's type, or use app.task_queue(name, type, handler)"
        )
    return tp


class TaskDecorator(Protocol):
    """What :meth:`App.task` returns: makes a handler into a TaskQueue."""

    def __call__(self, fn: Callable[[T], object], /) -> TaskQueue[T]: ...


class App:
    """Task queues, extra consumers and a task store on one connector.

    ``connector``: a Connector, a URL, or None (``$KEW_URL``, else SQLite).
    ``store``: a TaskStore or store URL (default ``sqlite:///kew-tasks.sqlite3``),
    opened on first use (workers that do not record never open it).
    ``events``: False sends no task events at all (no status, no output;
    fastest, for fire-and-forget apps).
    """

    def __init__(
        self,
        connector: Connector | str | None = None,
        *,
        name: str = "kew",
        store: TaskStore | str | None = None,
        events_queue: str = "kew.task-events",
        retention_days: float = 30,
        events: bool = True,
    ) -> None:
        if isinstance(connector, str) or connector is None:
            self.connector: Connector = connect(connector)
            self._owns_connector = True
        else:
            self.connector = connector
            self._owns_connector = False
        self.name = name
        if not retention_days > 0:
            raise ValueError(f"retention_days must be positive, not {retention_days!r}")
        self.retention_days = retention_days
        #: Seconds between the recorder's retention passes (read when a
        #: recorder starts).
        self.prune_interval = 3600.0
        self._store: TaskStore | None = store if not isinstance(store, (str, type(None))) else None
        self._store_url = (
            store if isinstance(store, str) else (DEFAULT_STORE if store is None else "")
        )
        self._store_lock = threading.Lock()
        self._read_lock = threading.Lock()  # follow(): one store read at a time
        #: Whether ``App(store=...)`` named the store (workers then read its
        #: cancel marks; see docs/tasks.md, "Cancel").
        self.store_given = store is not None
        self.events: Queue[EventMessage] = Queue(
            self.connector, events_queue, cast("type[EventMessage]", EventMessage)
        )
        # (for the package: task queues and the worker) where task events go,
        # and the attempts running in this process
        self.emitter = Emitter(self.events, self.connector, enabled=events)
        self.running = Running(self.emitter)
        #: Where async task handlers run (a thread of its own, started at first use).
        self.event_loop = EventLoopThread(f"kew-loop-{name}")
        #: Tasks cancelled that this process's workers must not run (kept a day).
        self.cancels = CancelSet()
        self.queues: dict[str, TaskQueue[Any]] = {}
        self.consumers: list[tuple[Queue[Any], Callable[[Any], None], int]] = []

    @property
    def events_enabled(self) -> bool:
        """Does the app send task events (``App(events=...)``)?"""
        return self.emitter.enabled

    @events_enabled.setter
    def events_enabled(self, value: bool) -> None:
        self.emitter.enabled = value

    def __repr__(self) -> str:
        return f"App({self.name!r}, {self.connector.url!r}, queues={list(self.queues)})"

    # -- store ------------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        """The app's task store, opened on first use (``App(store=...)``,
        default :data:`DEFAULT_STORE`)."""
        with self._store_lock:
            if self._store is None:
                self._store = open_store(self._store_url)
            return self._store

    # -- declaring ----------------------------------------------------------------

    def task(
        self,
        queue: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        on_exceeded: Callable[[Any], object] | None = None,
        notify: bool = False,
        codec: str = "json",
        encryption_keys: str | Mapping[str, bytes] | None = None,
        concurrency: int | None = None,
        track: bool = True,
        time_limit: float | None = None,
    ) -> TaskDecorator:
        """Decorator: the handler's first parameter's annotation is the task
        type; the queue name defaults to the handler's name.

        The handler may be an ``async def``: it then runs on the worker's
        event loop (one per app), and ``time_limit`` (seconds) cancels an
        attempt that runs longer, failing it with
        :class:`~kew.task.TimeLimitExceeded` (see ``docs/async.md``)."""

        def declare(fn: Callable[[T], object]) -> TaskQueue[T]:
            tp = _first_param_type(fn)
            return self.task_queue(
                queue or fn.__name__,
                tp,
                fn,
                retry=retry,
                on_exceeded=on_exceeded,
                notify=notify,
                codec=codec,
                encryption_keys=encryption_keys,
                concurrency=concurrency,
                track=track,
                time_limit=time_limit,
            )

        return declare

    def task_queue(
        self,
        name: str,
        tp: type[T],
        handler: Callable[[T], object],
        *,
        retry: RetryPolicy | None = None,
        on_exceeded: Callable[[T], object] | None = None,
        notify: bool = False,
        codec: str | Codec[T] = "json",
        encryption_keys: str | Mapping[str, bytes] | None = None,
        concurrency: int | None = None,
        track: bool = True,
        time_limit: float | None = None,
    ) -> TaskQueue[T]:
        """Declare a task queue (explicit form of :meth:`task`)."""
        if name in self.queues:
            raise ValueError(f"task queue {name!r} is declared twice in app {self.name!r}")
        tq = TaskQueue(
            self,
            name,
            tp,
            handler,
            retry=retry,
            on_exceeded=on_exceeded,
            notify=notify,
            codec=codec,
            encryption_keys=encryption_keys,
            concurrency=concurrency,
            track=track and self.events_enabled,
            time_limit=time_limit,
        )
        self.queues[name] = tq
        return tq

    def command_task(
        self,
        name: str,
        tp: type[T],
        build: Callable[[T], CommandSpec | Sequence[str]],
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        nice: int | None = None,
        exit_codes: Mapping[int, ExitAction] | None = None,
        kill_grace: float = 5.0,
        on_exceeded: Callable[[T], object] | None = None,
        notify: bool = False,
        codec: str | Codec[T] = "json",
        encryption_keys: str | Mapping[str, bytes] | None = None,
        concurrency: int | None = None,
    ) -> TaskQueue[T]:
        """A task queue whose handler runs ``build(data)`` as a subprocess
        per attempt (see kew.task.command)."""
        check_sync(build, "the command builder")
        for code, action in (exit_codes or {}).items():
            if action not in ("success", "retry", "permanent"):
                raise ValueError(
                    f"exit code {code} maps to {action!r}: use 'success', 'retry' or 'permanent'"
                )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout!r}")

        def handler(data: T) -> None:
            from kew.task.context import current

            ctx = current()
            spec = build(data)
            result = run_command(spec, ctx, timeout=timeout, nice=nice, kill_grace=kill_grace)
            limit = spec.timeout if isinstance(spec, CommandSpec) and spec.timeout else timeout
            check_result(result, exit_codes, ctx, limit)

        return self.task_queue(
            name,
            tp,
            handler,
            retry=retry,
            on_exceeded=on_exceeded,
            notify=notify,
            codec=codec,
            encryption_keys=encryption_keys,
            concurrency=concurrency,
        )

    def consumer(
        self, queue: Queue[T], handler: Callable[[T], None], *, concurrency: int = 1
    ) -> None:
        """An extra plain consumer that workers run too (notifiers, mail,
        bookkeeping): ack after ``handler`` returns, dead letter if it raises.
        ``handler`` must be a plain function (an ``async def`` raises
        TypeError)."""
        check_sync(handler, "the consumer handler")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.consumers.append((queue, handler, concurrency))

    def on_event(self, listener: Callable[[TaskEvent], None]) -> None:
        """Call ``listener`` with every task event this process makes (as it
        happens, before it is sent): metrics and the like.  Must not block."""
        self.emitter.add_listener(listener)

    def queue_names(self) -> list[str]:
        """Every queue the app uses: its task queues, their outcome queues, its
        extra consumers' queues and the events queue."""
        names: list[str] = []
        for tq in self.queues.values():
            names.append(tq.name)
            if tq.outcomes is not None:
                names.append(tq.outcomes.name)
        names += [q.name for q, _, _ in self.consumers]
        names.append(self.events.name)
        return list(dict.fromkeys(names))

    # -- reading ----------------------------------------------------------------

    def status(self, task_id: str) -> TaskRecord | None:
        """The task's record (status, attempt, times, last error) from the
        store; None if the store has not heard of it."""
        return self.store.get(task_id)

    async def status_async(self, task_id: str) -> TaskRecord | None:
        """:meth:`status` for asyncio code: the store read in a thread."""
        return await asyncio.to_thread(self.status, task_id)

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset to ask
        for next."""
        return self.store.output(task_id, offset)

    def follow(
        self, task_id: str, *, interval: float = 0.25, timeout: float | None = None
    ) -> AsyncIterator[str]:
        """For asyncio code: the task's output as it is recorded, chunk by
        chunk, until the task is final (or ``timeout`` seconds passed); a web
        route streams it (docs/async.md).  The store is read in a thread, one
        read at a time, every ``interval`` seconds.  Raises KeyError for a
        task the store has never heard of."""
        return follow_output(
            self.status, self.output, self._read_lock, task_id, interval=interval, timeout=timeout
        )

    # -- cancelling -------------------------------------------------------------

    def cancel(self, task_id: str, *, by: str = "", store: TaskStore | None = None) -> CancelResult:
        """Cancel a task, queued or running, wherever its worker runs (see
        docs/tasks.md, "Cancel"): a queued task never starts, a running one
        has its ``cancelled`` flag set (a command task's process group is
        killed); either ends ``cancelled``, its output kept.  A task that
        ended already is left alone (``cancelled`` False in the result);
        cancelling twice is cancelling once.  ``by`` names who asked (logs);
        ``store``: where the task's record is (default :attr:`store`).
        Raises KeyError if the store has never heard of the task."""
        return cancel_task(self, task_id, by=by, store=store)

    async def cancel_async(
        self,
        task_id: str,
        *,
        by: str = "",
        store: TaskStore | None = None,
        on_store: StoreRunner | None = None,
        connector: AsyncConnector | None = None,
    ) -> CancelResult:
        """:meth:`cancel` for asyncio code, with the same steps, semantics
        and result: the event and the cancel messages are sent with the
        async API (on ``connector``, default the app's async connector,
        the one ``TaskQueue.submit_async`` uses); the task store, a sync
        API, is read and written off the loop by ``on_store(fn)``, which
        awaits ``fn(store)`` (default: in a thread of the loop's executor,
        on ``store``, default :attr:`store`).  ``kew serve`` passes its own
        connection and its store thread.  Raises KeyError if the store has
        never heard of the task."""
        return await cancel_task_async(
            self, task_id, by=by, store=store, on_store=on_store, connector=connector
        )

    # -- running ----------------------------------------------------------------

    def recorder(self) -> Subscription:
        """Consume the events queue into :attr:`store` (batches of up to
        512 events per transaction); also drops final tasks older than
        ``retention_days``, with their output, every :attr:`prune_interval`
        seconds.  One batch loop serves any load a store can take (a store
        applies one transaction at a time); for more, run more recorders."""
        return Recorder(
            self.events,
            self.store,
            retention_days=self.retention_days,
            prune_interval=self.prune_interval,
        ).subscribe(self.connector)

    def worker(
        self,
        *,
        concurrency: int = 4,
        queues: Sequence[str] | None = None,
        record: bool = False,
        metrics_port: int | None = None,
        prefetch: int | None = None,
    ) -> Worker:
        """A :class:`~kew.task.worker.Worker` (not started): ``run()`` it, or
        ``start()`` / ``stop()`` it.  ``prefetch``: deliveries held per task
        queue (default = concurrency)."""
        from kew.task.worker import Worker

        return Worker(
            self,
            concurrency=concurrency,
            queues=queues,
            record=record,
            metrics_port=metrics_port,
            prefetch=prefetch,
        )

    def active(self) -> list[TaskContext]:
        """Attempts running in this process now."""
        return self.running.active()

    def close(self) -> None:
        """Close the app's queues and store, and its connector if the app made
        it from a URL."""
        self.running.close()
        self.event_loop.close()
        for tq in self.queues.values():
            tq.queue.close()
            if tq.outcomes is not None:
                tq.outcomes.close()
        self.events.close()
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None
        if self._owns_connector:
            self.connector.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """``async with App(...)``: closed in a thread (closing waits on the
        broker), so the event loop goes on meanwhile."""
        await asyncio.to_thread(self.close)
