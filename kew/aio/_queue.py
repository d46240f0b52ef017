"""``kew.aio.Queue``: the typed queue of :mod:`kew.qchan`, awaited.

What does no I/O is the sync queue's own code (kew.qchan: the codecs,
``encode_checked``, ``make_message``, ``delivery_schedule``; kew.qchan.policy:
the poison cap, the decode, the reasons and log lines), so that both APIs
write the same messages and dead-letter with the same reasons.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from kew.core.msg import CountedSchedule, Delay, FutureTimepoint
from kew.qchan import DeadLetterInfo
from kew.qchan._message import (
    DEFAULT_MAX_DELIVERIES,
    check_queue_name,
    delivery_schedule,
    encode_checked,
    make_message,
    queue_codecs,
)
from kew.qchan.codec import Codec, DecodeError, type_name
from kew.qchan.policy import DeliveryPolicy
from kew.qchan.runtime import STALL_AFTER
from kew.qchan.spi import (
    ConsumerFailed,
    Headers,
    Message,
    QueueFull,
    QueueStats,
    now_ms,
)
from kew.qchan.spi import Delivery as RawDelivery
from kew.qchan.spi.aio import AsyncBrowser, AsyncConnector, AsyncConsumer, AsyncProducer

from ._runtime import Subscription
from ._sends import ChunkedSends

__all__ = ["DeadLetters", "Deliveries", "Delivery", "Queue", "QueueBrowser", "check_async"]

T = TypeVar("T")

log = logging.getLogger("kew")


def check_async(handler: object, what: str) -> None:
    """Refuse anything but an ``async def`` (or an object whose ``__call__``
    is one) where kew.aio awaits a handler: a plain function's result would
    be awaited, and fail, only when the first message comes."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - the attribute, not callable()
    if not (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)):
        name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
        raise TypeError(
            f"{what} {name} is not an async function: kew.aio awaits it; "
            "pass an `async def` (or use kew.Queue.sink, the sync API, for a plain function)"
        )


class Queue(Generic[T]):
    """A typed queue on an async connector (``kew.aio.connect``): the async
    twin of :class:`kew.Queue`, with the same arguments and semantics.

    Making one does no I/O: the queue is declared by the first operation
    that needs it.
    """

    def __init__(
        self,
        connector: AsyncConnector,
        name: str,
        tp: type[T],
        *,
        codec: str | Codec[T] = "json",
        durable: bool = True,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_depth: int | None = None,
        encryption_keys: str | Mapping[str, bytes] | None = None,
    ) -> None:
        """As :class:`kew.Queue`: ``max_depth`` refuses sends (``QueueFull``)
        while the queue holds that many; ``encryption_keys`` encrypts bodies."""
        self.connector = connector
        self.name = check_queue_name(name)
        self.type = tp
        self._plain, self.codec = queue_codecs(name, tp, codec, encryption_keys)
        self.durable = durable
        self.max_deliveries = max_deliveries
        self.max_depth = max_depth
        self._type_name = type_name(tp)
        #: Per-delivery policy (poison cap, decode): the sync queue's.
        self.policy = DeliveryPolicy(name, self.codec, self._type_name, max_deliveries)
        self._lock = asyncio.Lock()  # (binds to a loop only when contended)
        self._declared = False
        self._producer_: AsyncProducer | None = None
        self._browser_: AsyncBrowser | None = None
        self._sends = ChunkedSends(lambda data, id: self.message(data, id=id), self._send_chunk)

    def __repr__(self) -> str:
        return f"kew.aio.Queue({self.name!r}, {self._type_name}, {self.connector.url!r})"

    async def declare(self) -> None:
        """Create the queue and its dead letters if missing (idempotent;
        every operation does it first, once)."""
        if self._declared:
            return
        async with self._lock:
            if not self._declared:
                await self.connector.declare(self.name)
                self._declared = True

    async def producer(self) -> AsyncProducer:
        """The queue's producer (made on first use), for messages built with
        :meth:`message`."""
        if self._producer_ is None:
            await self.declare()
            async with self._lock:
                if self._producer_ is None:
                    self._producer_ = await self.connector.producer(self.name)
        return self._producer_

    async def _browser(self) -> AsyncBrowser:
        if self._browser_ is None:
            await self.declare()
            async with self._lock:
                if self._browser_ is None:
                    self._browser_ = await self.connector.browser(self.name)
        return self._browser_

    # -- sending ----------------------------------------------------------

    def message(
        self, data: T, deliver_at: int | None = None, count: int = 1, id: str | None = None
    ) -> Message:
        """The message :meth:`send` would send for ``data`` (checked, encoded,
        with kew's headers), without sending it; as :meth:`kew.Queue.message`."""
        return make_message(
            self.name,
            encode_checked(self.name, self._plain, self.codec, data),
            content_type=self.codec.content_type,
            type_label=self._type_name,
            max_size=self.connector.max_message_size,
            durable=self.durable,
            deliver_at=deliver_at,
            count=count,
            id=id,
        )

    def schedule(self, delivery: RawDelivery) -> CountedSchedule:
        """A delivery's schedule from its headers (as :meth:`kew.Queue.schedule`)."""
        return delivery_schedule(delivery)

    async def _check_depth(self, adding: int) -> None:
        if self.max_depth is None:
            return
        s = await (await self._browser()).stats()
        depth = max(s.ready, 0) + max(s.delayed, 0) + max(s.in_flight, 0)
        if depth + adding > self.max_depth:
            raise QueueFull(self.name, depth, self.max_depth)

    async def send(self, data: T, /) -> None:
        """Send ``data``; returns once the broker has it.  Coroutines sending
        at the same time share round trips (kew.aio._sends)."""
        await self.post(data)

    async def post(
        self, data: T, /, *, id: str | None = None, deliver_at: int | None = None
    ) -> str:
        """Send ``data`` and return its message id (``id`` if given, else a
        new one); ``deliver_at`` (epoch ms) delays it."""
        if deliver_at is None and self.max_depth is None:
            return await self._sends.send(data, id)
        message = self.message(data, deliver_at, id=id)
        await self._check_depth(1)
        await (await self.producer()).send(message)
        return message.id

    async def _send_chunk(self, messages: Sequence[Message]) -> None:
        await (await self.producer()).send_many(messages)

    async def send_many(self, items: Iterable[T], /) -> None:
        """Send every item; returns once the broker has them all (one batch).
        A bad item raises ``InvalidValue`` before anything is sent."""
        sent_at = now_ms()
        batch = [
            make_message(
                self.name,
                encode_checked(self.name, self._plain, self.codec, data),
                content_type=self.codec.content_type,
                type_label=self._type_name,
                max_size=self.connector.max_message_size,
                durable=self.durable,
                sent_at=sent_at,
            )
            for data in items
        ]
        await self._check_depth(len(batch))
        await (await self.producer()).send_many(batch)

    async def send_at(self, when: FutureTimepoint, data: T, /) -> None:
        """Send ``data`` for delivery at ``when`` (never before)."""
        message = self.message(data, when.epoch_ms)
        await self._check_depth(1)
        await (await self.producer()).send(message)

    async def send_after(self, delay: Delay, data: T, /) -> None:
        """Send ``data`` for delivery after ``delay`` (a timedelta or seconds)."""
        await self.send_at(FutureTimepoint.after(delay), data)

    # -- consuming --------------------------------------------------------

    async def _consumer(self, prefetch: int) -> AsyncConsumer:
        await self.declare()
        return await self.connector.consumer(self.name, prefetch)

    async def _ready(self) -> int:
        return (await (await self._browser()).stats()).ready

    def sink(
        self,
        handler: Callable[[T], Awaitable[object]],
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        stall_after: float = STALL_AFTER,
    ) -> Subscription:
        """Consume now with ``handler``, an ``async def`` taking a ``T``, on
        ``concurrency`` coroutines.  A message is acked after the handler
        returns; if it raises, the message goes to the dead letters with the
        traceback.  ``prefetch`` pins the deliveries held at most; without
        it the window adapts (``Subscription.window``): the concurrency for
        long handlers, more for short ones, whose acks are then committed
        together.

        Call it from a coroutine; ``async with q.sink(h):`` (or ``await``)
        waits until it runs.  A plain function raises TypeError here.
        """
        check_async(handler, "the sink handler")
        policy = self.policy

        async def handle(consumer: AsyncConsumer, delivery: RawDelivery) -> bool:
            admitted = await policy.admit_async(consumer, delivery)
            if admitted is None:
                return False
            try:
                await handler(admitted[0])
            except Exception as e:
                await consumer.dead_letter(delivery, policy.failure(delivery, e))
                return False
            return True  # acked by the subscription (in a group while its window is wide)

        return Subscription(
            self._consumer,
            handle,
            name=self.name,
            concurrency=concurrency,
            prefetch=prefetch,
            waiting=self._ready,
            stall_after=stall_after,
        )

    #: The same as :meth:`sink` (the name the issue's examples use).
    consume = sink

    def deliveries(self, *, prefetch: int = 1, poll_interval: float = 0.5) -> Deliveries[T]:
        """The deliveries, one by one, for ``async for``, each settled by
        the caller (``await d.ack()``, ``await d.dead_letter(reason)``)::

            async with q.deliveries(prefetch=4) as stream:
                async for d in stream:
                    await work(d.value)
                    await d.ack()

        At most ``prefetch`` are held unsettled; leaving the ``async with``
        hands back every one not settled.  Bodies that do not decode, and
        messages over the poison cap, go to the dead letters without being
        yielded (as with :meth:`sink`)."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        return Deliveries(self, prefetch, poll_interval)

    # -- browsing ---------------------------------------------------------

    def browser(self) -> QueueBrowser[T]:
        """Read the queue without consuming: peek, stats, purge."""
        return QueueBrowser(self)

    @property
    def dead(self) -> DeadLetters:
        """The dead letters of this queue: list, requeue, purge."""
        return DeadLetters(self)

    async def close(self) -> None:
        """Close the producer and browser this queue made (not the connector)."""
        producer, browser = self._producer_, self._browser_
        self._producer_ = self._browser_ = None
        if producer is not None:
            await producer.close()
        if browser is not None:
            await browser.close()


class QueueBrowser(Generic[T]):
    """Reads a queue without consuming it (``Queue.browser()``)."""

    def __init__(self, queue: Queue[T]) -> None:
        self._queue = queue

    async def peek(self, limit: int = 100) -> list[T]:
        """Up to ``limit`` ready messages, decoded, none removed; bodies
        that do not decode are left out."""
        out: list[T] = []
        for m in await (await self._queue._browser()).peek(limit):
            try:
                out.append(self._queue.codec.decode(m.body))
            except DecodeError:
                continue
        return out

    async def stats(self) -> QueueStats:
        """The queue's counts by state (ready, in flight, delayed, dead); -1
        where the broker cannot tell."""
        return await (await self._queue._browser()).stats()

    async def purge(self) -> int:
        """Delete every ready and delayed message (not the dead letters);
        returns how many, or -1."""
        return await (await self._queue._browser()).purge()


class DeadLetters:
    """The dead letters of a queue (``Queue.dead``): list, requeue, purge."""

    def __init__(self, queue: Queue[Any]) -> None:
        self._queue = queue

    async def list(self, limit: int = 100) -> list[DeadLetterInfo]:
        """Up to ``limit`` dead letters, oldest first, each with its id,
        reason, delivery count, time and body."""
        dead = await (await self._queue._browser()).dead_letters(limit)
        return [DeadLetterInfo.of(d) for d in dead]

    async def requeue(self, ids: Collection[str] | None = None) -> int:
        """Put the dead letters ``ids`` (all if None) back on the queue as
        they were sent; returns how many."""
        return await (await self._queue._browser()).requeue_dead(ids)

    async def purge(self, ids: Collection[str] | None = None) -> int:
        """Delete the dead letters ``ids`` (all if None); returns how many."""
        return await (await self._queue._browser()).purge_dead(ids)


class Delivery(Generic[T]):
    """One message of :meth:`Queue.deliveries`, decoded, to be settled once:
    :meth:`ack`, :meth:`dead_letter` or :meth:`release` (a second settle is a
    no-op)."""

    def __init__(self, stream: Deliveries[T], raw: RawDelivery, value: T) -> None:
        self._stream = stream
        #: The provider's delivery (message, delivery count, tag).
        self.raw = raw
        #: The message's value, decoded as the queue's type.
        self.value = value
        self.settled = False

    @property
    def id(self) -> str:
        """The message id."""
        return self.raw.message.id

    @property
    def delivery_count(self) -> int:
        """1 the first time; more when delivered again."""
        return self.raw.delivery_count

    @property
    def headers(self) -> Headers:
        """The message's headers (kew's wire-format headers included)."""
        return self.raw.message.headers

    def __repr__(self) -> str:
        return f"kew.aio.Delivery({self.id!r}, {self.value!r}, count={self.delivery_count})"

    async def ack(self) -> None:
        """Done: the message leaves the queue."""
        await self._settle(lambda c: c.ack(self.raw))

    async def dead_letter(self, reason: str) -> None:
        """Move the message to the dead letters with ``reason``."""
        await self._settle(lambda c: c.dead_letter(self.raw, reason))

    async def release(self) -> None:
        """Hand the message back for redelivery."""
        await self._settle(lambda c: c.release(self.raw))

    async def _settle(self, settle: Callable[[AsyncConsumer], Awaitable[None]]) -> None:
        if self.settled:
            return
        self.settled = True
        await self._stream._settled(settle)


class Deliveries(Generic[T]):
    """``async with q.deliveries() as stream: async for d in stream: ...``
    (see :meth:`Queue.deliveries`)."""

    def __init__(self, queue: Queue[T], prefetch: int, poll_interval: float) -> None:
        self._queue = queue
        self.prefetch = prefetch
        self._poll = poll_interval
        self._consumer: AsyncConsumer | None = None
        self._buffer: deque[RawDelivery] = deque()  # fetched, not yielded
        self._held = 0  # fetched, not settled
        self._room = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Deliveries[T]:
        if self._closed:
            raise RuntimeError("this stream of deliveries is closed: make another")
        if self._consumer is None:
            self._consumer = await self._queue._consumer(self.prefetch)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop (the iteration ends): every delivery not settled is handed back."""
        consumer, self._consumer = self._consumer, None
        self._closed = True
        self._buffer.clear()
        self._room.set()  # an iteration waiting for room ends
        if consumer is not None:
            await consumer.close()

    def __aiter__(self) -> Deliveries[T]:
        return self

    async def __anext__(self) -> Delivery[T]:
        while True:
            consumer = self._consumer
            if consumer is None and self._closed:
                raise StopAsyncIteration
            if consumer is None:
                raise RuntimeError(
                    "use `async with q.deliveries() as stream:` to iterate: leaving it "
                    "hands back what was not settled"
                )
            while self._buffer:
                raw = self._buffer.popleft()
                admitted = await self._queue.policy.admit_async(consumer, raw)
                if admitted is None:
                    self._held -= 1
                    continue
                return Delivery(self, raw, admitted[0])
            if self._held >= self.prefetch:  # wait for one to be settled
                self._room.clear()
                await self._room.wait()
                continue
            batch = await self._fetch(consumer, self.prefetch - self._held)
            self._held += len(batch)
            self._buffer.extend(batch)

    async def _fetch(self, consumer: AsyncConsumer, most: int) -> list[RawDelivery]:
        try:
            batch = list(await consumer.fetch(most, self._poll))
        except ConsumerFailed:
            raise
        except Exception as e:  # a passing fault: retried, as by a subscription
            log.warning("kew: fetching from %s failed; retrying: %s", self._queue.name, e)
            await asyncio.sleep(1.0)
            return []
        return batch

    async def _settled(self, settle: Callable[[AsyncConsumer], Awaitable[None]]) -> None:
        consumer = self._consumer
        if consumer is None:  # closed: it was handed back
            return
        self._held -= 1
        self._room.set()
        await settle(consumer)
