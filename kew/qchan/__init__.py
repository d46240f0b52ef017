"""Queue-backed typed channels, over any provider.

>>> import kew
>>> q = kew.Queue(kew.connect("memory://"), "greetings", str)
>>> q.send("hello")
>>> q.browser().peek()
['hello']
"""

from __future__ import annotations

import logging
import os
import re
import traceback
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
from kew.qchan.codec import Codec, DecodeError, make_codec, type_name
from kew.qchan.runtime import Subscription
from kew.qchan.spi import (
    Browser,
    Connector,
    Consumer,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    QueueFull,
    QueueStats,
    now_ms,
)

__all__ = ["DeadLetters", "Queue", "QueueBrowser", "Subscription"]

T = TypeVar("T")
log = logging.getLogger("kew")

# Wire-format header names (docs/wire-format.md).
H_CONTENT_TYPE = "content-type"
H_TYPE = "kew-type"
H_SENT_AT = "kew-sent-at"
H_DELIVER_AT = "kew-deliver-at"
H_COUNT = "kew-count"

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

#: A message delivered this many times without being settled (its consumer
#: keeps dying on it) goes to the dead letters instead of being retried.
DEFAULT_MAX_DELIVERIES = 10


def new_id() -> str:
    """A random 128-bit message id, as 32 hex digits."""
    return os.urandom(16).hex()


def check_queue_name(name: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise ValueError(
            f"invalid queue name {name!r}: use 1-200 letters, digits, '_', '.', '-', "
            "not starting with '.' or '-'"
        )
    return name


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
        self.codec: Codec[T] = make_codec(tp, codec)
        if encryption_keys is not None:
            from kew.qchan.crypto import EncryptedCodec

            self.codec = EncryptedCodec(self.codec, encryption_keys, context=name)
        self.durable = durable
        self.max_deliveries = max_deliveries
        self.max_depth = max_depth
        self._depth_browser: Browser | None = None
        self._type_name = type_name(tp)
        connector.declare(name)
        self._producer = connector.producer(name)

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, {self._type_name}, {self.connector.url!r})"

    # -- sending ----------------------------------------------------------

    def _message(
        self, data: T, deliver_at: int | None = None, count: int = 1, id: str | None = None
    ) -> Message:
        body = self.codec.encode(data)
        limit = self.connector.max_message_size
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit, self.name)
        headers: dict[str, str | int] = {
            H_CONTENT_TYPE: self.codec.content_type,
            H_TYPE: self._type_name,
            H_SENT_AT: now_ms(),
        }
        if count != 1:
            headers[H_COUNT] = count
        if deliver_at is not None:
            headers[H_DELIVER_AT] = deliver_at
        return Message(id or new_id(), body, headers, self.durable, deliver_at)

    def _stats(self) -> QueueStats:
        """The queue's counts, through a browser kept for the purpose."""
        if self._depth_browser is None:
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
        encode, limit, durable = self.codec.encode, self.connector.max_message_size, self.durable
        static: tuple[str, str, int] = (self.codec.content_type, self._type_name, now_ms())
        batch = []
        for data in items:  # encode all first: a bad item sends nothing
            body = encode(data)
            if len(body) > limit:
                raise MessageTooLarge(len(body), limit, self.name)
            headers: dict[str, str | int] = {
                H_CONTENT_TYPE: static[0],
                H_TYPE: static[1],
                H_SENT_AT: static[2],
            }
            batch.append(Message(new_id(), body, headers, durable))
        self._check_depth(len(batch))
        self._producer.send_many(batch)

    def send_at(self, when: FutureTimepoint, data: T, /) -> None:
        self._check_depth(1)
        self._producer.send(self._message(data, when.epoch_ms))

    def send_after(self, delay: Delay, data: T, /) -> None:
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
        consumer: ChannelSink[T] | Callable[[T], object],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Consume with a plain sink, now, on background threads.

        A message is acked after the consumer returns.  If it raises, the
        message goes to the dead letters with the error (no retry loop).
        """
        sink = as_sink(consumer)
        return self._subscribe(lambda d, data: sink.consume(data), concurrency, prefetch)

    def message_sink(
        self,
        consumer: Callable[[ChannelMessage[CountedSchedule, T]], object],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
    ) -> Subscription:
        """Like :meth:`sink`, with the counted-schedule metadata too."""
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

        An exception from ``consumer`` counts as ``REPEAT``.
        """

        def attempt(data: T) -> RepeatAction:
            try:
                return consumer(data)
            except Exception:
                log.warning("kew: consumer on %s failed; will repeat", self.name, exc_info=True)
                return RepeatAction.REPEAT

        repeater = MessageRepeater(attempt, retry_intervals, on_exceeded)
        return self.reschedulable_sink(repeater, concurrency=concurrency, prefetch=prefetch)

    def _sent_as(self, delivery: Delivery) -> str:
        """For a body that did not decode: a note when it was sent with
        another content type (kew decodes with the queue's codec whatever the
        header says, docs/wire-format.md)."""
        sent = delivery.message.headers.get(H_CONTENT_TYPE)
        mine = self.codec.content_type
        if not isinstance(sent, str) or sent.split(";")[0].strip().lower() == mine:
            return ""
        return f" (sent as {sent[:80]!r}; queue {self.name!r} reads {mine})"

    def _schedule(self, delivery: Delivery) -> CountedSchedule:
        h = delivery.message.headers
        when = h.get(H_DELIVER_AT) or h.get(H_SENT_AT) or now_ms()
        count = h.get(H_COUNT, 1)
        if not isinstance(when, int) or not isinstance(count, int) or count < 1:
            raise DecodeError(
                f"bad schedule headers: {H_DELIVER_AT}/{H_SENT_AT}={when!r}, {H_COUNT}={count!r}"
            )
        return CountedSchedule(FutureTimepoint(when), count)

    def _subscribe(
        self,
        process: Callable[[Delivery, T], object],
        concurrency: int,
        prefetch: int | None,
    ) -> Subscription:
        decode = self.codec.decode
        max_deliveries = self.max_deliveries
        type_label = self._type_name
        sent_as = self._sent_as

        def handler(consumer: Consumer, delivery: Delivery) -> None:
            if delivery.delivery_count > max_deliveries:
                consumer.dead_letter(
                    delivery,
                    f"delivered {delivery.delivery_count} times without being settled "
                    f"(more than max_deliveries={max_deliveries}): its consumer may crash on it",
                )
                return
            try:
                data = decode(delivery.message.body)
            except DecodeError as e:
                consumer.dead_letter(
                    delivery, f"cannot decode as {type_label}: {e}{sent_as(delivery)}"
                )
                return
            try:
                process(delivery, data)
            except DecodeError as e:
                consumer.dead_letter(delivery, f"cannot decode: {e}")
                return
            except Exception as e:
                tb = "".join(traceback.format_exception(e, limit=-8))
                consumer.dead_letter(delivery, f"{type(e).__name__}: {e}\n{tb}")
                return
            consumer.ack(delivery)

        prefetch = prefetch or concurrency
        consumer = self.connector.consumer(self.name, prefetch)
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
        return QueueBrowser(self)

    @property
    def dead(self) -> DeadLetters:
        """The dead letters of this queue: list, requeue, purge."""
        return DeadLetters(self)

    def close(self) -> None:
        self._producer.close()


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
        return self._browser.stats()

    def purge(self) -> int:
        return self._browser.purge()


class DeadLetters:
    def __init__(self, queue: Queue[Any]) -> None:
        self._browser = queue.connector.browser(queue.name)

    def list(self, limit: int = 100) -> list[DeadLetterInfo]:
        return [DeadLetterInfo.of(d) for d in self._browser.dead_letters(limit)]

    def requeue(self, ids: Collection[str] | None = None) -> int:
        return self._browser.requeue_dead(ids)

    def purge(self, ids: Collection[str] | None = None) -> int:
        return self._browser.purge_dead(ids)
