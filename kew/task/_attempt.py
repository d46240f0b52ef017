"""A task queue and the state machine of one attempt.

How an attempt runs (:meth:`TaskQueue.subscribe`): the task's message is
delivered (its id is the task id, its ``kew-count`` header the attempt
number) and admitted by the queue's :class:`~kew.qchan.policy.DeliveryPolicy`
(poison cap, decode; what it dead-letters is also recorded as a failed
task); the handler runs with a :class:`~kew.task.context.TaskContext`;
then, *before* the delivery is acked:

* success: the attempt's events (``running``, output, ``succeeded``) are
  sent in one batch, the ``succeeded`` outcome if the queue notifies;
* failure with another attempt allowed: the task's message is sent again
  (same id, ``kew-count`` + 1, delivered at now + the policy's delay), then
  the events (``retry-scheduled``) and the ``attempt-failed`` outcome;
  logged at WARNING (INFO for a :class:`~kew.task.errors.Retry` raised on
  purpose) with when the next attempt is due;
* final failure (:class:`~kew.task.errors.Permanent`, or no attempt left):
  the exceeded handler runs once, the events (``failed``) and the
  ``failed`` outcome are sent, and the message goes to the queue's dead
  letters with the error, where it can be listed and requeued; logged at
  ERROR;
* cancelled (``App.cancel``; see ``kew.task._cancel``): a task the app
  knows as cancelled before its attempt starts is not run; an attempt whose
  cancel came while it ran ends so, whatever its handler returned or
  raised.  Either way the events (output, ``cancelled``) are sent and the
  delivery acked: no retry, no dead letter, no outcome; logged at INFO.

So a crash at any point repeats work (at-least-once) but never loses a task.
Log lines name the queue, the task id, the attempt and the exception's type
and message (never the task's value); tracebacks only at DEBUG.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import msgspec

from kew.core.msg import CountedSchedule, FutureTimepoint
from kew.qchan import Queue, Subscription
from kew.qchan._message import H_COUNT, H_DELIVER_AT
from kew.qchan.codec import Codec, DecodeError
from kew.qchan.policy import DeliveryPolicy
from kew.qchan.runtime import HANDED_OVER, GroupSettle, Handover
from kew.qchan.spi import Consumer, Delivery, Message, now_ms
from kew.task._async_attempt import AsyncRoute, Pending
from kew.task._async_run import is_async_handler, run_coroutine, run_local
from kew.task._failures import RecordingDeadLetters, error_text, log_failure, logged, scrub
from kew.task._submit import deliver_at, items_of, submitter
from kew.task.context import TaskContext, reset_current, set_current
from kew.task.errors import Permanent, Retry
from kew.task.model import Outcome, OutcomeKind, TaskEvent
from kew.task.retry import DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from kew.task.app import App

__all__ = ["Hold", "TaskQueue", "error_text", "scrub"]

T = TypeVar("T")
log = logging.getLogger("kew.task")

Hold = Callable[[], Callable[[], None]]
"""``Subscription.hold``: keeps a delivery counted as held until called back."""

_JSON = msgspec.json.Encoder()


def _iso(epoch_ms: int) -> str:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


class _Attempt:
    """One run of one attempt, and what settling it needs."""

    __slots__ = (
        "batch",
        "consumer",
        "ctx",
        "delivery",
        "handover",
        "held",
        "hold",
        "schedule",
        "settler",
    )

    def __init__(
        self,
        consumer: Consumer,
        delivery: Delivery,
        ctx: TaskContext,
        schedule: CountedSchedule,
        settler: GroupSettle | None,
        hold: Hold | None,
    ) -> None:
        self.consumer = consumer
        self.delivery = delivery
        self.ctx = ctx
        self.schedule = schedule
        self.settler = settler
        self.hold = hold
        #: Taken by ``_settle`` (the delivery is settled later).
        self.held = False
        #: An async attempt's: its delivery held (kew.task._async_attempt).
        self.handover: Handover | None = None
        #: An async attempt's finisher batch: settles to commit together.
        self.batch: list[Pending] | None = None


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
        time_limit: float | None = None,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"the handler of task queue {name!r} must be callable, not {handler!r}")
        #: An ``async def`` handler runs on the app's event loop (kew.task._async_run).
        self.is_async = is_async_handler(handler)
        if time_limit is not None:
            if not self.is_async:
                raise TypeError(
                    f"time_limit needs an async def handler (a thread cannot be stopped): "
                    f"{getattr(handler, '__qualname__', handler)!r} is a plain function; a "
                    "command task has timeout="
                )
            if not time_limit > 0:
                raise ValueError(f"time_limit must be positive seconds, not {time_limit!r}")
        self.time_limit = time_limit
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
        # The queue's admission policy, naming the type as the task layer does.
        self.queue.policy = DeliveryPolicy(
            name, self.queue.codec, self._type_label(), self.queue.max_deliveries
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
        """Queue a task (to run after ``delay`` seconds) and return its id
        (``id`` if given, else a new random one).

        ``data`` is checked against the queue's type first (a worker could
        not decode it): kew.DecodeError says what is wrong, and nothing is
        sent.  The task and its ``queued`` status event go out in one round
        trip, shared with the submits of other threads at that moment
        (``kew.task._submit``); returns once both are durable, and raises if
        they could not be stored (the task may or may not be queued then,
        as after a failed ``send``)."""
        self.validate(data)
        due = deliver_at(delay)
        return submitter(self.app).submit(self, [(data, id)], due)[0]

    def submit_many(self, items: Iterable[T], *, delay: float | None = None) -> list[str]:
        """Queue a task for each of ``items`` and return their ids, in order:
        every item validated first (nothing sent if one is not valid), then
        all the tasks and their ``queued`` events in one round trip."""
        due = deliver_at(delay)
        return submitter(self.app).submit(self, items_of(self, items), due)

    async def submit_async(
        self, data: T, *, delay: float | None = None, id: str | None = None
    ) -> str:
        """:meth:`submit` from a coroutine: the event loop never blocks (the
        provider's native async route, else a thread waits on the broker);
        the coroutines submitting at once share round trips."""
        self.validate(data)
        due = deliver_at(delay)
        return (await submitter(self.app).submit_async(self, [(data, id)], due))[0]

    async def submit_many_async(
        self, items: Iterable[T], *, delay: float | None = None
    ) -> list[str]:
        """:meth:`submit_many` from a coroutine (see :meth:`submit_async`)."""
        due = deliver_at(delay)
        return await submitter(self.app).submit_async(self, items_of(self, items), due)

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
        goes to the ``kew.task.output`` logger (tests, local use).  For an
        async handler, a coroutine that does so: ``await queue(data)``."""
        out = logging.getLogger("kew.task.output")

        def emit(events: Sequence[TaskEvent]) -> None:
            for e in events:
                if e.text:
                    out.info("%s", e.text.rstrip("\n"))

        ctx = TaskContext(f"local-{os.urandom(8).hex()}", self.name, 1, data=data, emit=emit)
        if self.is_async:  # a coroutine to await, with ctx current inside it
            return run_local(cast("Callable[[T], Awaitable[object]]", self.handler), data, ctx)
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
        """Start consuming: ``concurrency`` handlers; the window adapts
        (the concurrency for long tasks, more for short ones) unless
        ``prefetch`` pins it (never less than concurrency)."""
        policy, schedule = self.queue.policy, self.queue.schedule

        def handler(consumer: Consumer, delivery: Delivery) -> object:
            admitted = policy.admit(admitting, delivery)  # poison cap, decode
            if admitted is None:
                return None
            try:
                current = schedule(delivery)
            except DecodeError as e:  # bad kew-count / kew-deliver-at headers
                admitting.dead_letter(delivery, f"cannot decode as {self._type_label()}: {e}")
                return None
            # (the subscription's threads may start before it is assigned)
            hold = subs[0].hold if subs else None
            return self._run(
                consumer, delivery, admitted[0], current, worker_id, settler, hold, route
            )

        events = self.app.emitter.queue
        producers = {self.name: self.queue.producer, events.name: events.producer}

        def send_many(queue: str, messages: Sequence[Message]) -> None:
            producers[queue].send_many(messages)

        self.queue.declare()
        consumer = self.app.connector.consumer(self.name, prefetch or concurrency)
        admitting = RecordingDeadLetters(
            consumer, lambda d, reason: self._failed_for_good(d, worker_id, reason)
        )
        # Handlers finishing together settle together: their last events (or
        # next attempts) and their acks in one commit (see GroupSettle).
        settler = GroupSettle(consumer, send_many, pack=self.app.emitter.pack)
        # An async handler's attempts run to their end on the app's loop.
        route = AsyncRoute(self, concurrency, settler) if self.is_async else None
        subs: list[Subscription] = []
        sub = Subscription(
            consumer,
            handler,
            name=self.name,
            concurrency=concurrency,
            prefetch=prefetch,  # None: the adaptive window (kew.qchan._window)
            inline=route is not None,  # (the handler hands async attempts over)
        )
        subs.append(sub)
        if route is not None:
            route.sub = sub
        return sub

    def _failed_for_good(self, delivery: Delivery, worker_id: str, reason: str) -> None:
        """A delivery dead-lettered before its handler ran (poison cap, a
        body or headers that do not decode): logged, and recorded as a
        failed task."""
        task_id = delivery.message.id
        log.error(
            "kew: %s: task %s failed for good: %s; it went to the dead letters",
            self.name,
            task_id,
            scrub(reason),
        )
        if not self.track:
            return
        count = delivery.message.headers.get(H_COUNT, 1)
        event = TaskEvent(
            task_id,
            self.name,
            "failed",
            now_ms(),
            attempt=count if isinstance(count, int) else 1,
            run=now_ms(),
            worker=worker_id,
            error=reason,
        )
        self.app.emitter.tell(event)
        try:
            self.app.emitter.emit([event])
        except Exception:
            log.exception("kew: cannot record the failure of task %s", task_id)

    def _run(
        self,
        consumer: Consumer,
        delivery: Delivery,
        data: T,
        schedule: CountedSchedule,
        worker_id: str,
        settler: GroupSettle | None = None,
        hold: Hold | None = None,
        route: AsyncRoute | None = None,
    ) -> object:
        """One attempt; returns ``HANDED_OVER`` when ``route`` took it (an
        async handler: the route's finisher ends it)."""
        app = self.app
        emitter, running = app.emitter, app.running
        ctx = TaskContext(
            delivery.message.id,
            self.name,
            schedule.count,
            worker=worker_id,
            data=data,
            emit=emitter.emit if self.track else None,
        )
        att = _Attempt(consumer, delivery, ctx, schedule, settler, hold)
        if ctx.id in app.cancels:  # cancelled while it waited: never runs
            self._cancel(att, started=False)
            return None
        started = ctx.event("running", at=ctx.run)
        emitter.tell(started)
        if self.track:
            ctx.add_pending(started)
        running.start(ctx, delivery)
        handed = False
        try:
            if ctx.id in app.cancels:  # (came between the look above and running.start)
                ctx.request_cancel()
            if route is not None and not ctx.cancel_requested:
                handed = route.hand_over(att, data)
                if handed:
                    return HANDED_OVER
            error = None if ctx.cancel_requested else self._call(ctx, data)
            self._after(att, error)
            return None
        finally:
            if not handed:
                running.end(ctx)

    def _after(self, att: _Attempt, error: BaseException | None) -> None:
        """What follows the handler's end (``error``: what it raised)."""
        ctx = att.ctx
        if ctx.cancelled.is_set() and self.app.running.handed_back(ctx):
            return  # handed back already (worker shutdown): the next run records itself
        if ctx.cancel_requested:
            self._cancel(att, started=True)
            return
        if error is None:
            self._succeed(att)
            return
        delay = None if isinstance(error, Permanent) else self.retry.delay(ctx.attempt)
        if delay is not None and isinstance(error, Retry) and error.after is not None:
            delay = error.after
        if delay is None:
            self._fail(att, error)
        else:
            self._reschedule(att, error, delay)

    def _call(self, ctx: TaskContext, data: T) -> Exception | None:
        """Run the handler in ``ctx``; what it raised, written to the output."""
        token = set_current(ctx)
        try:
            if self.is_async:
                handler = cast("Callable[[T], Awaitable[object]]", self.handler)
                run_coroutine(self.app.event_loop, handler, data, ctx, self.time_limit)
            else:
                self.handler(data)
            return None
        except Exception as e:
            tb = e.__traceback__.tb_next if e.__traceback__ else None  # not kew's frame
            self.noted(ctx, e, tb)
            return e
        finally:
            reset_current(token)

    def noted(self, ctx: TaskContext, e: BaseException, tb: TracebackType | None) -> None:
        """What a handler raised, written to the task's output (from ``tb``)."""
        if isinstance(e, (Permanent, Retry)):
            if not ctx.cancel_requested:  # (a cancelled attempt says so itself)
                ctx.log(f"[kew] attempt {ctx.attempt} failed: {error_text(e)}")
        else:
            ctx.write("".join(traceback.format_exception(type(e), e, tb)))

    def _attempt_of(self, attempt: int) -> str:
        """``"2 of 5"``, or ``"2"`` when the policy does not say how many."""
        most = getattr(self.retry, "max_attempts", None)
        return f"{attempt} of {most}" if isinstance(most, int) else str(attempt)

    def _last_events(self, ctx: TaskContext, final: TaskEvent) -> list[TaskEvent]:
        """The attempt's last output and its end event, to send in one batch
        (none when not tracked).  A "running" event not sent yet (a short
        attempt) is left out: the end event says as much (its ``run`` is when
        the attempt started)."""
        emitter = self.app.emitter
        events = ctx.take()
        if events and events[0].kind == "running":
            del events[0]
        for e in events:
            if e.kind == "output":
                emitter.tell(e)
        emitter.tell(final)
        if not self.track:
            return []
        events.append(final)
        return events

    def _settle(
        self,
        att: _Attempt,
        events: Sequence[TaskEvent],
        next_attempt: Message | None = None,
    ) -> None:
        """Make ``events`` (and ``next_attempt``) durable, then ack: in one
        group commit when there is a settler, else one step after the other.
        With a ``hold`` (the subscription's), the handler thread does not wait
        for the commit: the delivery stays counted as held until it is done,
        and the thread takes the next delivery meanwhile."""
        emitter = self.app.emitter
        consumer, delivery, settler, hold = att.consumer, att.delivery, att.settler, att.hold
        if settler is not None and (not events or emitter.outbox):
            sends: list[tuple[str, Message]] = []
            if att.batch is None and events:
                sends.append((emitter.queue.name, emitter.message(events)))
            if next_attempt is not None:
                sends.append((self.name, next_attempt))
            if hold is None:
                settler.settle((delivery,), sends)
                return
            settled = hold()
            att.held = True
            task_id = delivery.message.id

            def done(error: BaseException | None) -> None:
                try:
                    if error is not None:
                        log.error(
                            "kew: settling task %s on %s failed (%s); it will be delivered again",
                            task_id,
                            self.name,
                            error_text(error),
                        )
                        consumer.release(delivery)
                except Exception:
                    log.exception("kew: handing back task %s failed", task_id)
                finally:
                    settled()

            if att.batch is not None:  # an async attempt's: with those ending with it
                att.batch.append((delivery, events, sends, done))
            else:
                settler.settle_later((delivery,), sends, done)
            return
        if next_attempt is not None:
            self.queue.producer.send(next_attempt)
        if events:
            emitter.emit(events)
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

    def _cancel(self, att: _Attempt, *, started: bool) -> None:
        """The task was cancelled: its output and the ``cancelled`` event,
        then the ack (no retry, no dead letter, no outcome)."""
        ctx = att.ctx
        if started:
            ctx.log(f"[kew] attempt {ctx.attempt} cancelled on request")
        else:
            ctx.log(f"[kew] cancelled before attempt {ctx.attempt} started: not run")
        log.info(
            "kew: %s: task %s cancelled (attempt %s%s)",
            self.name,
            ctx.id,
            ctx.attempt,
            "" if started else ", not run",
        )
        self._settle(att, self._last_events(ctx, ctx.event("cancelled")))

    def _succeed(self, att: _Attempt) -> None:
        ctx = att.ctx
        events = self._last_events(ctx, ctx.event("succeeded"))
        self._outcome(ctx, "succeeded", "", None)
        self._settle(att, events)

    def _fail(self, att: _Attempt, error: BaseException) -> None:
        """The last attempt failed: exceeded handler, ``failed`` event and
        outcome, dead letter."""
        ctx = att.ctx
        text = error_text(error)
        permanent = isinstance(error, Permanent)
        if permanent:
            reason = f"permanent failure in attempt {ctx.attempt}: {text}"
        else:
            reason = f"failed after {ctx.attempt} attempt{'s' if ctx.attempt > 1 else ''}: {text}"
        log_failure(
            logging.ERROR,
            "kew: %s: task %s attempt %s failed (%s); %s: it goes to the dead letters",
            self.name,
            ctx.id,
            self._attempt_of(ctx.attempt),
            logged(error),
            "a permanent failure" if permanent else "no attempts left",
            error=error,
        )
        if self.on_exceeded is not None:
            self._exceeded(ctx)
        events = self._last_events(ctx, ctx.event("failed", error=reason))
        if events:
            self.app.emitter.emit(events)
        self._outcome(ctx, "failed", reason, None)
        att.consumer.dead_letter(att.delivery, reason)

    def _exceeded(self, ctx: TaskContext) -> None:
        assert self.on_exceeded is not None
        token = set_current(ctx)
        try:
            if is_async_handler(self.on_exceeded):
                fn = cast("Callable[[T], Awaitable[object]]", self.on_exceeded)
                run_coroutine(self.app.event_loop, fn, cast(T, ctx.data), ctx, None)
            else:
                self.on_exceeded(cast(T, ctx.data))
        except Exception as e:
            log_failure(
                logging.ERROR,
                "kew: %s: the exceeded handler failed for task %s (%s)",
                self.name,
                ctx.id,
                logged(e),
                error=e,
            )
            ctx.write("[kew] the exceeded handler failed:\n" + traceback.format_exc())
        finally:
            reset_current(token)

    def _reschedule(self, att: _Attempt, error: BaseException, delay: float) -> None:
        """Another attempt is allowed: the task's message again (same id,
        body and headers; count + 1, due after ``delay``), then the events
        and the ``attempt-failed`` outcome, then the ack."""
        ctx, msg = att.ctx, att.delivery.message
        nxt = att.schedule.next(FutureTimepoint.after(max(delay, 0.0)))
        headers: dict[str, str | int] = dict(msg.headers)
        headers[H_COUNT] = nxt.count
        headers[H_DELIVER_AT] = nxt.when.epoch_ms
        # The next attempt is durable before (or together with) this one's ack.
        next_attempt = Message(msg.id, msg.body, headers, msg.durable, nxt.when.epoch_ms)
        on_purpose = isinstance(error, Retry)
        log_failure(
            logging.INFO if on_purpose else logging.WARNING,
            "kew: %s: task %s attempt %s %s (%s); next attempt at %s",
            self.name,
            ctx.id,
            self._attempt_of(ctx.attempt),
            "asked to be retried" if on_purpose else "failed",
            logged(error),
            _iso(nxt.when.epoch_ms),
            error=None if on_purpose else error,
        )
        text = error_text(error)
        events = self._last_events(
            ctx, ctx.event("retry-scheduled", error=text, next_at=nxt.when.epoch_ms)
        )
        self._outcome(ctx, "attempt-failed", text, nxt.when.epoch_ms)
        self._settle(att, events, next_attempt)
