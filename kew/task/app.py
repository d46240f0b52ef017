"""The task layer's entry point: an :class:`App` declares task queues.

    import kew.task

    app = kew.task.App("redis://127.0.0.1:6379/0")

    @app.task(retry=kew.task.Intervals.minutes(10, 10, 120))
    def thumbnail(job: Thumbnail) -> None:
        kew.task.current().log(f"rendering {job.image_id}")
        ...

    task_id = thumbnail.submit(Thumbnail(image_id=1))   # from anywhere
    # kew worker mymodule:app    runs it; kew task <id> shows it

How an attempt runs (``TaskQueue._run``): the task's message is delivered
(its id is the task id, its ``kew-count`` header the attempt number); the
handler runs with a :class:`~kew.task.context.TaskContext`; then, *before*
the delivery is acked:

* success: the attempt's events (``running``, output, ``succeeded``) are
  sent in one batch, the ``succeeded`` outcome if the queue notifies;
* failure with another attempt allowed: the task's message is sent again
  (same id, ``kew-count`` + 1, delivered at now + the policy's delay), then
  the events (``retry-scheduled``) and the ``attempt-failed`` outcome;
* final failure (:class:`~kew.task.errors.Permanent`, or no attempt left):
  the exceeded handler runs once, the events (``failed``) and the
  ``failed`` outcome are sent, and the message goes to the queue's dead
  letters with the error, where it can be listed and requeued.

So a crash at any point repeats work (at-least-once) but never loses a task.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
import traceback
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast

import msgspec

from kew.connect import connect
from kew.qchan import H_CONTENT_TYPE, H_COUNT, H_DELIVER_AT, Queue, Subscription, new_id
from kew.qchan.codec import JSON, Codec, DecodeError
from kew.qchan.runtime import BatchSubscription, GroupCommit, GroupSettle
from kew.qchan.spi import Connector, Consumer, Delivery, Message, now_ms
from kew.task.command import CommandSpec, ExitAction, check_result, run_command
from kew.task.context import (
    FLUSH_INTERVAL,
    TaskContext,
    reset_current,
    set_current,
)
from kew.task.errors import Permanent, Retry
from kew.task.model import EventMessage, Outcome, OutcomeKind, TaskEvent, TaskRecord
from kew.task.retry import DEFAULT_RETRY, RetryPolicy
from kew.task.store import TaskStore, open_store

if TYPE_CHECKING:
    from kew.task.worker import Worker

__all__ = ["DEFAULT_STORE", "App", "TaskQueue"]

T = TypeVar("T")
log = logging.getLogger("kew.task")

DEFAULT_STORE = "sqlite:///kew-tasks.sqlite3"
"""Where task status and output are kept when ``App(store=...)`` is not
given."""

#: Event messages a recorder applies in one store transaction at most.
RECORDER_BATCH = 512

#: Largest body of one packed event message (a JSON array of TaskEvents).
PACK_BYTES = 256 * 1024

Hold = Callable[[], Callable[[], None]]
"""``Subscription.hold``: keeps a delivery counted as held until called back."""


_JSON = msgspec.json.Encoder()


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


def _error_text(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, (Permanent, Retry)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- a subscription that hands whole batches to its handler -------------------


# -- task queues ----------------------------------------------------------------


class TaskQueue(Generic[T]):
    """A typed queue + handler + retry policy + exceeded handler.

    ``submit`` queues a task and returns its id; workers (``App.worker``,
    ``kew worker``) run the handler.  Any program may also submit a task by
    sending a plain ``T`` on :attr:`queue`: the message id is the task id.
    """

    def __init__(
        self,
        app: App,
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
    ) -> None:
        if not callable(handler):
            raise TypeError(f"the handler of task queue {name!r} must be callable, not {handler!r}")
        retry = DEFAULT_RETRY if retry is None else retry
        if not callable(getattr(retry, "delay", None)):
            raise TypeError(
                f"retry must be a RetryPolicy (Intervals, Exponential, NoRetry...), not {retry!r}"
            )
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.app = app
        self.name = name
        self.type = tp
        self.handler = handler
        self.retry: RetryPolicy = retry
        self.on_exceeded = on_exceeded
        self.concurrency = concurrency
        self.track = track
        self.queue: Queue[T] = Queue(
            app.connector, name, tp, codec=codec, encryption_keys=encryption_keys
        )
        self.outcomes: Queue[Outcome[T]] | None = None
        if notify:
            self.outcomes = Queue(
                app.connector,
                f"{name}.outcomes",
                cast("type[Outcome[T]]", Outcome[tp]),  # type: ignore[valid-type]
                codec="json" if isinstance(codec, str) and codec == "json" else "msgpack",
                encryption_keys=encryption_keys,
            )
        self._json = msgspec.json.Decoder(tp)

    def __repr__(self) -> str:
        return f"TaskQueue({self.name!r}, {getattr(self.type, '__name__', self.type)})"

    # -- submitting -----------------------------------------------------------

    def submit(self, data: T, *, delay: float | None = None, id: str | None = None) -> str:
        """Queue a task (to run after ``delay`` seconds) and return its id.

        ``data`` is checked against the queue's type first (a worker could
        not decode it): kew.DecodeError says what is wrong, and nothing is
        sent."""
        self.validate(data)
        deliver_at = None
        if delay is not None:
            if not delay >= 0:
                raise ValueError(f"delay must be a non-negative number of seconds, not {delay!r}")
            deliver_at = now_ms() + round(delay * 1000)
        task_id = self.queue.post(data, id=id, deliver_at=deliver_at)
        if self.track:
            event = TaskEvent(task_id, self.name, "queued", now_ms(), next_at=deliver_at)
            self.app._tell(event)
            try:
                self.app._emit([event])
            except Exception:  # the task is queued: its status shows once it runs
                log.exception("kew: task %s is queued but its 'queued' event failed", task_id)
        return task_id

    def validate(self, data: T) -> None:
        """Raise kew.DecodeError if ``data`` would not decode as the
        queue's type on a worker (a wrong type, a field of the wrong type)."""
        try:
            self._json.decode(_JSON.encode(data))
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as e:
            raise DecodeError(f"not a valid {self._type_label()}: {e}") from None

    def decode_json(self, body: bytes | str) -> T:
        """``body`` (JSON) as a ``T``; raises kew.DecodeError saying why not."""
        try:
            return self._json.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError(f"not a valid {self._type_label()}: {e}") from None

    def submit_json(self, body: bytes | str, *, delay: float | None = None) -> str:
        """Validate ``body`` against the queue's type, then :meth:`submit`."""
        return self.submit(self.decode_json(body), delay=delay)

    def _type_label(self) -> str:
        return getattr(self.type, "__name__", None) or repr(self.type)

    def __call__(self, data: T) -> object:
        """Run the handler here and now, with a task context whose output
        goes to the ``kew.task.output`` logger (tests, local use)."""
        out = logging.getLogger("kew.task.output")

        def emit(events: Sequence[TaskEvent]) -> None:
            for e in events:
                if e.text:
                    out.info("%s", e.text.rstrip("\n"))

        ctx = TaskContext(f"local-{os.urandom(8).hex()}", self.name, 1, data=data, emit=emit)
        token = set_current(ctx)
        try:
            return self.handler(data)
        finally:
            reset_current(token)
            ctx.flush()

    # -- running ----------------------------------------------------------------

    def subscribe(
        self, worker_id: str, concurrency: int, prefetch: int | None = None
    ) -> Subscription:
        """Start consuming: ``concurrency`` handlers, prefetch = concurrency
        unless given (never less than concurrency)."""
        max_deliveries = self.queue.max_deliveries

        def handler(consumer: Consumer, delivery: Delivery) -> None:
            if delivery.delivery_count > max_deliveries:
                reason = (
                    f"delivered {delivery.delivery_count} times without being settled "
                    f"(more than max_deliveries={max_deliveries}): its worker may crash on it"
                )
                self._poison(consumer, delivery, worker_id, reason)
                return
            try:
                data = self.queue.codec.decode(delivery.message.body)
                attempt = self.queue._schedule(delivery).count
            except DecodeError as e:
                self._poison(
                    consumer, delivery, worker_id, f"cannot decode as {self._type_label()}: {e}"
                )
                return
            # (the subscription's threads may start before it is assigned)
            hold = subs[0].hold if subs else None
            self._run(consumer, delivery, data, attempt, worker_id, settler, hold)

        app = self.app
        producers = {self.name: self.queue._producer, app.events.name: app.events._producer}

        def send_many(queue: str, messages: Sequence[Message]) -> None:
            producers[queue].send_many(messages)

        self.queue.declare()
        consumer = app.connector.consumer(self.name, prefetch or concurrency)
        # Handlers finishing together settle together: their last events (or
        # next attempts) and their acks in one commit (see GroupSettle).
        settler = GroupSettle(consumer, send_many, pack=app._pack_events)
        subs: list[Subscription] = []
        sub = Subscription(
            consumer,
            handler,
            name=self.name,
            concurrency=concurrency,
            prefetch=prefetch or concurrency,
        )
        subs.append(sub)
        return sub

    def _poison(self, consumer: Consumer, delivery: Delivery, worker_id: str, reason: str) -> None:
        consumer.dead_letter(delivery, reason)
        if self.track:
            count = delivery.message.headers.get(H_COUNT, 1)
            event = TaskEvent(
                delivery.message.id,
                self.name,
                "failed",
                now_ms(),
                attempt=count if isinstance(count, int) else 1,
                run=now_ms(),
                worker=worker_id,
                error=reason,
            )
            self.app._tell(event)
            try:
                self.app._emit([event])
            except Exception:
                log.exception("kew: cannot record the failure of task %s", event.task_id)

    def _run(
        self,
        consumer: Consumer,
        delivery: Delivery,
        data: T,
        attempt: int,
        worker_id: str,
        settler: GroupSettle | None = None,
        hold: Hold | None = None,
    ) -> None:
        app = self.app
        msg = delivery.message
        ctx = TaskContext(
            msg.id,
            self.name,
            attempt,
            worker=worker_id,
            data=data,
            emit=app._emit if self.track else None,
        )
        running = ctx.event("running", at=ctx.run)
        app._tell(running)
        if self.track:
            ctx.add_pending(running)
        app._started(ctx, delivery)
        try:
            error = self._call(ctx, data)
            if ctx.cancelled.is_set() and app._abandoned(ctx):
                return  # handed back already (worker shutdown): the next run records itself
            if error is None:
                self._finish(consumer, delivery, ctx, "succeeded", None, settler, hold)
                return
            delay = None if isinstance(error, Permanent) else self.retry.delay(attempt)
            if delay is not None and isinstance(error, Retry) and error.after is not None:
                delay = error.after
            if delay is None:
                self._finish(consumer, delivery, ctx, "failed", error, settler)
            else:
                self._reschedule(consumer, delivery, ctx, error, delay, settler, hold)
        finally:
            app._ended(ctx)

    def _call(self, ctx: TaskContext, data: T) -> Exception | None:
        """Run the handler in ``ctx``; what it raised, written to the output."""
        token = set_current(ctx)
        try:
            self.handler(data)
            return None
        except Exception as e:
            if isinstance(e, (Permanent, Retry)):
                ctx.log(f"[kew] attempt {ctx.attempt} failed: {_error_text(e)}")
            else:
                tb = e.__traceback__.tb_next if e.__traceback__ else None  # not kew's frame
                ctx.write("".join(traceback.format_exception(type(e), e, tb)))
            return e
        finally:
            reset_current(token)

    def _last_events(self, ctx: TaskContext, final: TaskEvent) -> list[TaskEvent]:
        """The attempt's last output and its end event, to send in one batch
        (none when not tracked).  A "running" event not sent yet (a short
        attempt) is left out: the end event says as much (its ``run`` is when
        the attempt started)."""
        events = ctx.take()
        if events and events[0].kind == "running":
            del events[0]
        for e in events:
            if e.kind == "output":
                self.app._tell(e)
        self.app._tell(final)
        if not self.track:
            return []
        events.append(final)
        return events

    def _events(self, ctx: TaskContext, final: TaskEvent) -> None:
        """Send the attempt's last output and its end event (one batch)."""
        events = self._last_events(ctx, final)
        if events:
            self.app._emit(events)

    def _settle(
        self,
        consumer: Consumer,
        delivery: Delivery,
        events: Sequence[TaskEvent],
        settler: GroupSettle | None,
        next_attempt: Message | None = None,
        hold: Hold | None = None,
    ) -> None:
        """Make ``events`` (and ``next_attempt``) durable, then ack: in one
        group commit when there is a settler, else one step after the other.
        With ``hold`` (the subscription's), the handler thread does not wait
        for the commit: the delivery stays counted as held until it is done,
        and the thread takes the next delivery meanwhile."""
        app = self.app
        if settler is not None and (not events or app.events.max_depth is None):
            sends = [(app.events.name, app.events._message(list(events)))] if events else []
            if next_attempt is not None:
                sends.append((self.name, next_attempt))
            if hold is None:
                settler.settle((delivery,), sends)
                return
            settled = hold()
            task_id = delivery.message.id

            def done(error: BaseException | None) -> None:
                try:
                    if error is not None:
                        log.error(
                            "kew: settling task %s on %s failed (%s); it will be delivered again",
                            task_id,
                            self.name,
                            _error_text(error),
                        )
                        consumer.release(delivery)
                except Exception:
                    log.exception("kew: handing back task %s failed", task_id)
                finally:
                    settled()

            settler.settle_later((delivery,), sends, done)
            return
        if next_attempt is not None:
            self.queue._producer.send(next_attempt)
        if events:
            app._emit(events)
        consumer.ack(delivery)

    def _outcome(
        self, ctx: TaskContext, kind: OutcomeKind, error: str, next_at: int | None
    ) -> None:
        if self.outcomes is not None:
            self.outcomes.send(
                Outcome(
                    ctx.id,
                    self.name,
                    kind,
                    ctx.attempt,
                    now_ms(),
                    cast(T, ctx.data),
                    error=error,
                    next_at=next_at,
                )
            )

    def _finish(
        self,
        consumer: Consumer,
        delivery: Delivery,
        ctx: TaskContext,
        kind: Literal["succeeded", "failed"],
        error: BaseException | None,
        settler: GroupSettle | None = None,
        hold: Hold | None = None,
    ) -> None:
        if kind == "succeeded":
            events = self._last_events(ctx, ctx.event("succeeded"))
            self._outcome(ctx, "succeeded", "", None)
            self._settle(consumer, delivery, events, settler, hold=hold)
            return
        assert error is not None
        text = _error_text(error)
        if isinstance(error, Permanent):
            reason = f"permanent failure in attempt {ctx.attempt}: {text}"
        else:
            reason = f"failed after {ctx.attempt} attempt{'s' if ctx.attempt > 1 else ''}: {text}"
        if self.on_exceeded is not None:
            token = set_current(ctx)
            try:
                self.on_exceeded(cast(T, ctx.data))
            except Exception:
                log.exception(
                    "kew: the exceeded handler of %s failed for task %s", self.name, ctx.id
                )
                ctx.write("[kew] the exceeded handler failed:\n" + traceback.format_exc())
            finally:
                reset_current(token)
        self._events(ctx, ctx.event("failed", error=reason))
        self._outcome(ctx, "failed", reason, None)
        consumer.dead_letter(delivery, reason)

    def _reschedule(
        self,
        consumer: Consumer,
        delivery: Delivery,
        ctx: TaskContext,
        error: BaseException,
        delay: float,
        settler: GroupSettle | None = None,
        hold: Hold | None = None,
    ) -> None:
        msg = delivery.message
        next_at = now_ms() + round(max(delay, 0.0) * 1000)
        headers: dict[str, str | int] = dict(msg.headers)
        headers[H_COUNT] = ctx.attempt + 1
        headers[H_DELIVER_AT] = next_at
        # The next attempt is durable before (or together with) this one's ack.
        next_attempt = Message(msg.id, msg.body, headers, msg.durable, next_at)
        text = _error_text(error)
        events = self._last_events(ctx, ctx.event("retry-scheduled", error=text, next_at=next_at))
        self._outcome(ctx, "attempt-failed", text, next_at)
        self._settle(consumer, delivery, events, settler, next_attempt, hold)


def _chunks(events: Sequence[TaskEvent]) -> list[list[TaskEvent]]:
    """``events`` cut into lists of at most about :data:`PACK_BYTES` each
    (one event message per list)."""
    chunks: list[list[TaskEvent]] = [[]]
    size = 0
    for e in events:
        n = 256 + len(e.text) + len(e.error)
        if chunks[-1] and size + n > PACK_BYTES // 2:
            chunks.append([])
            size = 0
        chunks[-1].append(e)
        size += n
    return chunks if chunks[0] else []


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
        #: Seconds between the recorder's retention passes.
        self.prune_interval = 3600.0
        self.events_enabled = events
        self._store: TaskStore | None = store if not isinstance(store, (str, type(None))) else None
        self._store_url = (
            store if isinstance(store, str) else (DEFAULT_STORE if store is None else "")
        )
        self._store_lock = threading.Lock()
        self.events: Queue[EventMessage] = Queue(
            self.connector, events_queue, cast("type[EventMessage]", EventMessage)
        )
        # events of concurrent handlers go out together, packed (see _pack_events)
        self._emitter: GroupCommit[Sequence[TaskEvent]] = GroupCommit(
            lambda batches: self.events.send_many(_chunks([e for b in batches for e in b]))
        )
        self.queues: dict[str, TaskQueue[Any]] = {}
        self.consumers: list[tuple[Queue[Any], Callable[[Any], object], int]] = []
        self._listeners: list[Callable[[TaskEvent], None]] = []
        self._lock = threading.Lock()
        self._active: dict[int, tuple[TaskContext, Delivery]] = {}
        self._dropped: set[int] = set()
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()

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
    ) -> TaskDecorator:
        """Decorator: the handler's first parameter's annotation is the task
        type; the queue name defaults to the handler's name."""

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
        self, queue: Queue[T], handler: Callable[[T], object], *, concurrency: int = 1
    ) -> None:
        """An extra plain consumer that workers run too (notifiers, mail,
        bookkeeping): ack after ``handler`` returns, dead letter if it raises."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.consumers.append((queue, handler, concurrency))

    def on_event(self, listener: Callable[[TaskEvent], None]) -> None:
        """Call ``listener`` with every task event this process makes (as it
        happens, before it is sent): metrics and the like.  Must not block."""
        self._listeners.append(listener)

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

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset to ask
        for next."""
        return self.store.output(task_id, offset)

    # -- running ----------------------------------------------------------------

    def recorder(self, *, concurrency: int = 1) -> Subscription:
        """Consume the events queue into :attr:`store` (batches of up to
        512 events per transaction); also drops final tasks older than
        ``retention_days``, with their output, once an hour
        (:attr:`prune_interval`).  ``concurrency`` is accepted for
        the CLI; one batch loop serves any load a store can take."""
        store = self.store
        decode = self.events.codec.decode
        retention_ms = int(self.retention_days * 86_400_000)
        last_prune = [0.0]

        def apply(consumer: Consumer, batch: Sequence[Delivery]) -> None:
            events: list[TaskEvent] = []
            good: list[Delivery] = []
            for d in batch:
                try:
                    body = decode(d.message.body)
                    if isinstance(body, list):
                        events += body
                    else:
                        events.append(body)
                    good.append(d)
                except DecodeError as e:
                    consumer.dead_letter(d, f"cannot decode as TaskEvent: {e}")
            store.apply(events)
            for d in good:
                consumer.ack(d)
            if time.monotonic() - last_prune[0] > self.prune_interval:
                last_prune[0] = time.monotonic()
                try:
                    n = store.prune(now_ms() - retention_ms)
                    if n:
                        log.info("kew: pruned %d tasks older than %s days", n, self.retention_days)
                except Exception:
                    log.exception("kew: pruning the task store failed")

        self.events.declare()
        consumer = self.connector.consumer(self.events.name, RECORDER_BATCH)
        return BatchSubscription(consumer, apply, name=self.events.name, prefetch=RECORDER_BATCH)

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

    # -- internals: events and running attempts ----------------------------------

    def _tell(self, event: TaskEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("kew: an on_event listener failed")

    def _emit(self, events: Sequence[TaskEvent]) -> None:
        if self.events_enabled and events:
            self._emitter.submit(events)

    def _pack_events(self, queue: str, messages: list[Message]) -> list[Message]:
        """GroupSettle's ``pack``: the event messages of one group commit
        (each a JSON array, one per attempt) joined into as few arrays as
        :data:`PACK_BYTES` allows, without decoding them.  Other queues'
        messages are left as they are."""
        if queue != self.events.name or len(messages) < 2:
            return messages
        limit = min(PACK_BYTES, self.connector.max_message_size)
        out: list[Message] = []
        parts: list[bytes] = []
        size = 2
        head = messages[0]  # its headers (content type, type) serve the pack

        def pack() -> None:
            body = b"[" + b",".join(parts) + b"]"
            out.append(Message(new_id(), body, head.headers, head.durable))

        for m in messages:
            body = m.body
            if m.headers.get(H_CONTENT_TYPE) != JSON:
                out.append(m)
                continue
            inner = body[1:-1] if body[:1] == b"[" else body
            if not inner:
                continue
            if parts and size + len(inner) + 1 > limit:
                pack()
                parts, size = [], 2
            if not parts:
                head = m
            parts.append(inner)
            size += len(inner) + 1
        if parts:
            pack()
        return out

    def _started(self, ctx: TaskContext, delivery: Delivery) -> None:
        with self._lock:
            self._active[id(ctx)] = (ctx, delivery)
            if self._flusher is None and self.events_enabled:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="kew-task-flusher", daemon=True
                )
                self._flusher.start()

    def _ended(self, ctx: TaskContext) -> None:
        with self._lock:
            self._active.pop(id(ctx), None)
            self._dropped.discard(id(ctx))

    def _abandoned(self, ctx: TaskContext) -> bool:
        with self._lock:
            return id(ctx) in self._dropped

    def active(self) -> list[TaskContext]:
        """Attempts running in this process now."""
        with self._lock:
            return [c for c, _ in self._active.values()]

    def _hand_back(self, contexts: Sequence[TaskContext]) -> None:
        """These attempts were handed back (worker shutdown): cancel them,
        and record them as queued again with what they logged."""
        events: list[TaskEvent] = []
        with self._lock:
            for ctx in contexts:
                if id(ctx) in self._active:
                    self._dropped.add(id(ctx))
        for ctx in contexts:
            ctx.cancelled.set()
            ctx.log(f"[kew] worker {ctx.worker} stopped: attempt {ctx.attempt} handed back")
            batch = ctx.take()
            released = ctx.event("released")
            self._tell(released)
            events += batch
            events.append(released)
        try:
            self._emit(events)
        except Exception:
            log.exception("kew: cannot record %d tasks handed back", len(contexts))

    def _flush_loop(self) -> None:
        while not self._closing.wait(FLUSH_INTERVAL):
            now = time.monotonic()
            for ctx in self.active():
                if ctx.due(now):
                    events = ctx.take()
                    for e in events:
                        if e.kind == "output":
                            self._tell(e)
                    try:
                        self._emit(events)
                    except Exception:
                        log.exception("kew: sending the output of task %s failed", ctx.id)
                        ctx.put_back(events)

    def close(self) -> None:
        """Close the app's queues and store, and its connector if the app made
        it from a URL."""
        self._closing.set()
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
