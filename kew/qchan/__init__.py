"""Queue-backed typed channels, over any provider.

>>> import kew
>>> q = kew.Queue(kew.connect("memory://"), "greetings", str)
>>> q.send("hello")
>>> q.browser().peek()
['hello']
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kew.core.msg import (
    ChannelMessage,
    ChannelSink,
    CountedSchedule,
    Delay,
    FutureTimepoint,
    MessageRepeater,
    RepeatAction,
    Reschedulable,
    ReschedulingSink,
    SchedulingSource,
    as_sink,
)
from kew.qchan._message import (
    DEFAULT_MAX_DELIVERIES,
    InvalidValue,
    _iso,
    check_sync,
    delivery_schedule,
    encode_checked,
    make_message,
    queue_codecs,
)
from kew.qchan._message import check_queue_name as check_queue_name
from kew.qchan._message import new_id as new_id
from kew.qchan.codec import Codec, DecodeError, type_name
from kew.qchan.policy import DeliveryPolicy, log_failure
from kew.qchan.runtime import Subscription
from kew.qchan.spi import (
    Browser,
    Connector,
    Consumer,
    DeadLetter,
    Delivery,
    Message,
    Producer,
    QueueFull,
    QueueStats,
    now_ms,
)

__all__ = ["DeadLetters", "InvalidValue", "Queue", "QueueBrowser", "Subscription"]

T = TypeVar("T")
log = logging.getLogger("kew")


class Queue(Generic[T]):
    """A typed queue on a connector: sources, sinks, a browser, dead letters.

    ``tp`` is the type of every message (a msgspec Struct, dataclass,
    TypedDict or builtin); sends are typed by it, and every body consumed is
    validated against it.
    """

    def __init__(
        self,
        connector: Connector,
        name: str,
        tp: type[T],
        *,
        codec: str | Codec[T] = "json",
        durable: bool = True,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_depth: int | None = None,
        encryption_keys: str | Mapping[str, bytes] | None = None,
    ) -> None:
        """``max_depth``: refuse sends (``QueueFull``) while the queue holds
        that many messages (ready, delayed and in flight).
        ``encryption_keys``: encrypt bodies with AES-GCM (see kew.qchan.crypto):
        ``"id1:BASE64,id2:BASE64"`` or a mapping; the last is used to encrypt."""
        self.connector = connector
        self.name = check_queue_name(name)
        self.type = tp
        # sends are validated with the plain codec; bodies travel in self.codec
        self._plain, self.codec = queue_codecs(name, tp, codec, encryption_keys)
        self.durable = durable
        self.max_deliveries = max_deliveries
        self.max_depth = max_depth
        self._depth_browser: Browser | None = None
        self._type_name = type_name(tp)
        #: Per-delivery policy (poison cap, decode) for this queue's consumers.
        self.policy = DeliveryPolicy(name, self.codec, self._type_name, max_deliveries)
        # No I/O here: the queue is declared and its producer made on first use.
        self._lock = threading.Lock()
        self._producer_: Producer | None = None
        self._declared = False

    def declare(self) -> None:
        """Create the queue and its dead letters on the broker if missing
        (idempotent; every operation does it first, once)."""
        if self._declared:
            return
        with self._lock:
            if not self._declared:
                self.connector.declare(self.name)
                self._declared = True

    @property
    def producer(self) -> Producer:
        """The queue's producer, made (and the queue declared) on first use:
        for sending :class:`~kew.qchan.spi.Message` s built elsewhere (see
        :meth:`message`), as they are."""
        producer = self._producer_
        if producer is None:
            self.declare()
            with self._lock:
                if self._producer_ is None:
                    self._producer_ = self.connector.producer(self.name)
                producer = self._producer_
        return producer

    _producer = producer  # (the name this module's own helpers use)

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, {self._type_name}, {self.connector.url!r})"

    # -- sending ----------------------------------------------------------

    def _encode(self, data: T) -> bytes:
        """The body for ``data``, checked against the queue's type first
        (the design promises validation on both ends): a value that would
        only fail later, as a dead letter on the consumer, raises
        :class:`InvalidValue` here and nothing is stored."""
        return encode_checked(self.name, self._plain, self.codec, data)

    def message(
        self, data: T, deliver_at: int | None = None, count: int = 1, id: str | None = None
    ) -> Message:
        """The message :meth:`send` would send for ``data`` (checked and
        encoded, with kew's headers), without sending it: for an outbox or
        a batch that sends it later through :attr:`producer`.
        ``deliver_at`` (epoch ms), ``count`` (``kew-count``) and ``id`` as
        in :meth:`post`."""
        return make_message(
            self.name,
            self._encode(data),
            content_type=self.codec.content_type,
            type_label=self._type_name,
            max_size=self.connector.max_message_size,
            durable=self.durable,
            deliver_at=deliver_at,
            count=count,
            id=id,
        )

    _message = message  # (the name this module's own helpers use)

    def _stats(self) -> QueueStats:
        """The queue's counts, through a browser kept for the purpose."""
        if self._depth_browser is None:
            self.declare()
            self._depth_browser = self.connector.browser(self.name)
        return self._depth_browser.stats()

    def _ready(self) -> int:
        """Messages waiting to be delivered (for a subscription's stall check)."""
        return self._stats().ready

    def _check_depth(self, adding: int) -> None:
        if self.max_depth is None:
            return
        s = self._stats()
        depth = max(s.ready, 0) + max(s.delayed, 0) + max(s.in_flight, 0)
        if depth + adding > self.max_depth:
            raise QueueFull(self.name, depth, self.max_depth)

    def send(self, data: T, /) -> None:
        """Send ``data``; returns once the broker has it."""
        self._check_depth(1)
        self._producer.send(self._message(data))

    def post(self, data: T, /, *, id: str | None = None, deliver_at: int | None = None) -> str:
        """Send ``data`` and return its message id (``id`` if given, else a
        new random one); ``deliver_at`` (epoch ms) delays it.  Returns once
        the broker has it.  The task layer uses the id as the task id."""
        self._check_depth(1)
        message = self._message(data, deliver_at, id=id)
        self._producer.send(message)
        return message.id

    def send_many(self, items: Iterable[T], /) -> None:
        """Send every item; returns once the broker has them all (one batch)."""
        encode, limit, durable = self._encode, self.connector.max_message_size, self.durable
        content_type, type_label, sent_at = self.codec.content_type, self._type_name, now_ms()
        batch = [  # encode all first: a bad item sends nothing
            make_message(
                self.name,
                encode(data),
                content_type=content_type,
                type_label=type_label,
                max_size=limit,
                durable=durable,
                sent_at=sent_at,
            )
            for data in items
        ]
        self._check_depth(len(batch))
        self._producer.send_many(batch)

    def send_at(self, when: FutureTimepoint, data: T, /) -> None:
        """Send ``data`` for delivery at ``when`` (not before); returns once the
        broker has it."""
        self._check_depth(1)
        self._producer.send(self._message(data, when.epoch_ms))

    def send_after(self, delay: Delay, data: T, /) -> None:
        """Send ``data`` for delivery after ``delay`` (a ``timedelta`` or
        seconds); returns once the broker has it."""
        self.send_at(FutureTimepoint.after(delay), data)

    def source(self) -> QueueSource[T]:
        """A :class:`ChannelSource` of ``T``."""
        return QueueSource(self)

    def scheduling_source(self) -> QueueSchedulingSource[T]:
        """A source whose message metadata is the delivery time."""
        return QueueSchedulingSource(self)

    # -- consuming --------------------------------------------------------

    def sink(
        self,
        consumer: ChannelSink[T] | Callable[[T], None],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Consume with a plain sink, now, on background threads.

        A message is acked after the consumer returns.  If it raises, the
        message goes to the dead letters with the error (no retry loop).
        The consumer returns None: an ``async def`` (whose coroutine would
        never be awaited) is refused by mypy and, at run time, with a
        TypeError; kew.aio's ``sink`` awaits one.

        Acks of handlers that returned meanwhile are committed together.
        ``prefetch`` pins the deliveries held at most; without it the window
        adapts (``Subscription.window``): the concurrency for long handlers,
        more for short ones.
        """
        check_sync(getattr(consumer, "consume", consumer), "the sink handler")
        sink = as_sink(consumer)
        return self._subscribe(lambda d, data: sink.consume(data), concurrency, prefetch)

    def message_sink(
        self,
        consumer: Callable[[ChannelMessage[CountedSchedule, T]], None],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Like :meth:`sink`, with the counted-schedule metadata too."""
        check_sync(consumer, "the message sink handler")
        return self._subscribe(
            lambda d, data: consumer(ChannelMessage(data, self._schedule(d))), concurrency, prefetch
        )

    def reschedulable_sink(
        self,
        consumer: Reschedulable[T],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Consume with a :class:`Reschedulable`: what it returns is put back
        on this queue (count + 1) before the delivery is acked."""
        check_sync(consumer.consume, "the reschedulable consumer")

        def handle(delivery: Delivery, data: T) -> None:
            resender = _Resender(self, delivery.message.id)
            ReschedulingSink(consumer, resender).consume(
                ChannelMessage(data, self._schedule(delivery))
            )

        return self._subscribe(handle, concurrency, prefetch)

    def repeat_sink(
        self,
        consumer: Callable[[T], RepeatAction],
        retry_intervals: Sequence[Delay],
        on_exceeded: Callable[[T], object],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Retry ``consumer`` on ``retry_intervals`` (see MessageRepeater).

        An exception from ``consumer`` counts as ``REPEAT``.  A failed
        attempt is logged at WARNING with when the next one is due (INFO
        when the consumer returned ``REPEAT`` without raising); the last
        one, handed to ``on_exceeded``, at ERROR.
        """
        check_sync(consumer, "the repeat-sink consumer")
        check_sync(on_exceeded, "the on_exceeded handler")
        raised = threading.local()

        def attempt(data: T) -> RepeatAction:
            raised.error = None
            try:
                action = consumer(data)
            except Exception as e:
                raised.error = e
                action = RepeatAction.REPEAT
            raised.repeat = action is RepeatAction.REPEAT
            return action

        repeater = MessageRepeater(attempt, retry_intervals, on_exceeded)
        name = self.name

        def consume(delivery: Delivery, data: T) -> None:
            current = self._schedule(delivery)
            nxt = repeater.consume(current, data)
            error: BaseException | None = getattr(raised, "error", None)
            what = f"{type(error).__name__}: {error}" if error else "the consumer asked to repeat"
            where = (name, delivery.message.id, current.count, repeater.max_attempts, what)
            if nxt is not None:
                due = _iso(nxt.when.epoch_ms)
                level = logging.WARNING if error else logging.INFO
                log_failure(
                    level,
                    "kew: %s: message %s attempt %d of %d failed (%s); next attempt at %s",
                    *where,
                    due,
                    error=error,
                )
                _Resender(self, delivery.message.id).send(
                    ChannelMessage(nxt.what, current.next(nxt.when))
                )
            elif raised.repeat:
                log_failure(
                    logging.ERROR,
                    "kew: %s: message %s attempt %d of %d failed (%s); no attempts left, "
                    "handed to on_exceeded",
                    *where,
                    error=error,
                )

        return self._subscribe(consume, concurrency, prefetch)

    def schedule(self, delivery: Delivery) -> CountedSchedule:
        """A delivery's schedule from its headers: when it was due and its
        ``kew-count`` (1 for a first delivery).  Raises kew.DecodeError when
        those headers are not integers (or the count is below 1)."""
        return delivery_schedule(delivery)

    _schedule = schedule  # (the name this module's own helpers use)

    def _subscribe(
        self,
        process: Callable[[Delivery, T], object],
        concurrency: int,
        prefetch: int | None,
    ) -> Subscription:
        policy = self.policy

        def handler(consumer: Consumer, delivery: Delivery) -> bool:
            admitted = policy.admit(consumer, delivery)
            if admitted is None:
                return False
            try:
                process(delivery, admitted[0])
            except Exception as e:  # logged, and its reason, as kew.aio's sink does
                # One at a time, on this thread: the SPI has no batched dead
                # letter (each is a move with its reason), and it is the
                # failure path.
                consumer.dead_letter(delivery, policy.failure(delivery, e))
                return False
            return True  # acked by the subscription, with others (GroupAck)

        self.declare()
        # Made with the concurrency as its window; without ``prefetch`` the
        # subscription widens it while handlers are short (kew.qchan._window).
        consumer = self.connector.consumer(self.name, prefetch or concurrency)
        return Subscription(
            consumer,
            handler,
            name=self.name,
            concurrency=concurrency,
            prefetch=prefetch,
            waiting=self._ready,
        )

    # -- browsing ---------------------------------------------------------

    def browser(self) -> QueueBrowser[T]:
        """Read the queue without consuming: peek, stats, purge."""
        self.declare()
        return QueueBrowser(self)

    @property
    def dead(self) -> DeadLetters:
        """The dead letters of this queue: list, requeue, purge."""
        self.declare()
        return DeadLetters(self)

    def close(self) -> None:
        """Close the producer (if one was made) and the stats browser."""
        if self._producer_ is not None:
            self._producer_.close()
        if self._depth_browser is not None:
            self._depth_browser.close()


class QueueSource(Generic[T]):
    """A :class:`ChannelSource` of ``T`` on a queue."""

    def __init__(self, queue: Queue[T]) -> None:
        self._queue = queue

    def send(self, data: T, /) -> None:
        self._queue.send(data)


class QueueSchedulingSource(SchedulingSource[T]):
    def __init__(self, queue: Queue[T]) -> None:
        self._queue = queue

    def send(self, message: ChannelMessage[FutureTimepoint, T], /) -> None:
        when = message.metadata.epoch_ms if message.metadata else None
        self._queue._producer.send(self._queue._message(message.data, when))


class _Resender(Generic[T]):
    """Puts a rescheduled message back on its queue, keeping its id."""

    def __init__(self, queue: Queue[T], message_id: str) -> None:
        self._queue = queue
        self._id = message_id

    def send(self, message: ChannelMessage[CountedSchedule, T], /) -> None:
        meta = message.metadata or CountedSchedule.first()
        q = self._queue
        q._producer.send(q._message(message.data, meta.when.epoch_ms, meta.count, self._id))


@dataclass(frozen=True)
class DeadLetterInfo:
    """A dead letter, for people and APIs: the body as text where it is."""

    id: str
    reason: str
    delivery_count: int
    dead_at: int
    headers: Mapping[str, str | int]
    body: bytes

    @property
    def body_text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @classmethod
    def of(cls, d: DeadLetter) -> DeadLetterInfo:
        m = d.message
        return cls(m.id, d.reason, d.delivery_count, d.dead_at, dict(m.headers), m.body)


class QueueBrowser(Generic[T]):
    """Reads a queue without consuming it (``Queue.browser()``): peek,
    stats, purge."""

    def __init__(self, queue: Queue[T]) -> None:
        self._queue = queue
        self._browser = queue.connector.browser(queue.name)

    def peek(self, limit: int = 100) -> list[T]:
        """Up to ``limit`` ready messages, decoded, none removed; bodies
        that do not decode are left out."""
        out: list[T] = []
        for m in self._browser.peek(limit):
            try:
                out.append(self._queue.codec.decode(m.body))
            except DecodeError:
                continue
        return out

    def stats(self) -> QueueStats:
        """The queue's counts by state (ready, in flight, delayed, dead); -1
        where the broker cannot tell."""
        return self._browser.stats()

    def purge(self) -> int:
        """Delete every ready and delayed message (not the dead letters);
        returns how many, or -1."""
        return self._browser.purge()


class DeadLetters:
    """The dead letters of a queue (``Queue.dead``): list, requeue and purge
    them."""

    def __init__(self, queue: Queue[Any]) -> None:
        self._browser = queue.connector.browser(queue.name)

    def list(self, limit: int = 100) -> list[DeadLetterInfo]:
        """Up to ``limit`` dead letters, oldest first, each with its id, reason,
        delivery count, time and body."""
        return [DeadLetterInfo.of(d) for d in self._browser.dead_letters(limit)]

    def requeue(self, ids: Collection[str] | None = None) -> int:
        """Put the dead letters ``ids`` (all if None) back on the queue as they
        were sent; returns how many."""
        return self._browser.requeue_dead(ids)

    def purge(self, ids: Collection[str] | None = None) -> int:
        """Delete the dead letters ``ids`` (all if None) for good; returns how
        many."""
        return self._browser.purge_dead(ids)
