"""``memory://[name]``: queues in this process's memory.

For tests and quick starts.  Connectors to the same name share queues;
nothing survives the process, and no other process can see them.
The smallest complete provider, and so the one to read first.

Its native async route (``MemoryConnector.aio()``, used by ``kew.aio``) runs
in the event loop without threads: an async fetch that finds nothing waits
on an ``asyncio.Event`` of its consumer, which the broker sets (through
``loop.call_soon_threadsafe`` from another thread) whenever it would wake
its sync waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from kew.qchan.spi import (
    Capability,
    ConfigError,
    ConnectorBase,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    now_ms,
)
from kew.qchan.spi.dedupe import ClaimResult

SCHEMES = ("memory",)


# -- options ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    name: str
    max_message_size: int

    @classmethod
    def from_url(cls, url: str) -> Options:
        parsed = ProviderURL.parse(url, SCHEMES)
        name = ",".join(h for h, _ in parsed.hosts) + parsed.path
        size = parsed.get_int("max_message_size", 16 * 1024 * 1024, minimum=1)
        parsed.finish()
        return cls(name or "default", size)


# -- the broker (what a server would be) -----------------------------------


@dataclass
class _Queue:
    ready: deque[tuple[Message, int]] = field(default_factory=deque)
    delayed: list[tuple[int, int, Message, int]] = field(default_factory=list)
    in_flight: dict[int, tuple[Message, int]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.queues: dict[str, _Queue] = {}
        self.tags = itertools.count(1)
        self.seq = itertools.count()
        #: dedupe records: namespace -> key -> (done, token, until)
        self.once: dict[str, dict[str, tuple[bool, str | None, int | None]]] = {}
        #: async fetches waiting for a message (under ``lock``)
        self.waiters: set[_Waiter] = set()

    def notify(self) -> None:
        """Wake every waiting fetch, sync and async (caller holds ``lock``)."""
        self.lock.notify_all()
        for waiter in self.waiters:
            waiter.wake()

    def queue(self, name: str) -> _Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise ConfigError(f"queue {name!r} is not declared") from None

    def put(self, name: str, message: Message, count: int = 0) -> None:
        q = self.queue(name)
        if message.deliver_at is not None and message.deliver_at > now_ms():
            heapq.heappush(q.delayed, (message.deliver_at, next(self.seq), message, count))
        else:
            q.ready.append((message, count))
        self.notify()

    def promote(self, q: _Queue) -> float | None:
        """Move due delayed messages to ready; seconds until the next is due."""
        now = now_ms()
        while q.delayed and q.delayed[0][0] <= now:
            _, _, message, count = heapq.heappop(q.delayed)
            q.ready.append((message, count))
        return (q.delayed[0][0] - now) / 1000 if q.delayed else None


_brokers: dict[str, _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(name: str) -> _Broker:
    with _brokers_lock:
        return _brokers.setdefault(name, _Broker())


# -- connector -------------------------------------------------------------


class MemoryConnector(ConnectorBase):
    lacks = {
        Capability.DURABLE: "memory:// keeps messages in this process's memory only",
        Capability.MULTIPROCESS: "memory:// queues are not visible to other processes",
    }

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted  # no password in repr or errors
        self.max_message_size = self.options.max_message_size
        self._broker = _broker(self.options.name)

    def __repr__(self) -> str:
        return f"MemoryConnector({self.url!r})"

    def declare(self, queue: str) -> None:
        with self._broker.lock:
            self._broker.queues.setdefault(queue, _Queue())

    def producer(self, queue: str) -> MemoryProducer:
        self.declare(queue)
        return MemoryProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> MemoryConsumer:
        self.declare(queue)
        return MemoryConsumer(self._broker, queue, prefetch, self.max_message_size)

    def browser(self, queue: str) -> MemoryBrowser:
        self.declare(queue)
        return MemoryBrowser(self._broker, queue)

    def delete(self, queue: str) -> None:
        with self._broker.lock:
            self._broker.queues.pop(queue, None)

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``MultiSender``: every message under one lock, all or none (each
        checked first: its size, its queue declared)."""
        for queue, m in sends:
            if len(m.body) > self.max_message_size:
                raise MessageTooLarge(len(m.body), self.max_message_size, queue)
        with self._broker.lock:
            for queue in {queue for queue, _ in sends}:
                self._broker.queue(queue)  # ConfigError if not declared
            for queue, m in sends:
                self._broker.put(queue, m)

    def aio(self) -> MemoryAsyncConnector:
        """The native async route (``kew.aio``): no thread per call."""
        return MemoryAsyncConnector(self)

    def dedupe_store(self, namespace: str) -> MemoryDedupeStore:
        """Records for ``kew.idempotency`` in this process's memory."""
        return MemoryDedupeStore(self._broker, namespace)

    def close(self) -> None:
        pass


# -- producer --------------------------------------------------------------


class MemoryProducer:
    def __init__(self, connector: MemoryConnector, queue: str) -> None:
        self._broker = connector._broker
        self._limit = connector.max_message_size
        self._queue = queue

    def send(self, message: Message) -> None:
        self.send_many((message,))

    def send_many(self, messages: Sequence[Message]) -> None:
        for m in messages:
            if len(m.body) > self._limit:
                raise MessageTooLarge(len(m.body), self._limit, self._queue)
        with self._broker.lock:
            for m in messages:
                self._broker.put(self._queue, m)

    def close(self) -> None:
        pass


# -- consumer --------------------------------------------------------------


class MemoryConsumer:
    def __init__(
        self, broker: _Broker, queue: str, prefetch: int, limit: int = 64 * 1024 * 1024
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._prefetch = prefetch
        self._limit = limit
        self._mine: set[int] = set()

    def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` deliveries
        (``WindowedConsumer``): a pull consumer takes only what ``fetch``
        asks for, so the bound is all there is to move."""
        self._prefetch = count

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        b = self._broker
        deadline = now_ms() + timeout * 1000
        with b.lock:
            while True:
                out, next_due = self._take(max_count)
                if out:
                    return out
                left = (deadline - now_ms()) / 1000
                if left <= 0:
                    return []
                b.lock.wait(min(left, next_due) if next_due is not None else left)

    def _take(self, max_count: int) -> tuple[list[Delivery], float | None]:
        """What a fetch gets now (caller holds the lock), and the seconds
        until the next delayed message is due (None: no delayed message)."""
        b = self._broker
        q = b.queue(self._queue)
        next_due = b.promote(q)
        room = min(max_count, self._prefetch - len(self._mine))
        out: list[Delivery] = []
        while q.ready and len(out) < room:
            message, count = q.ready.popleft()
            tag = next(b.tags)
            q.in_flight[tag] = (message, count + 1)
            self._mine.add(tag)
            out.append(Delivery(message, count + 1, tag))
        return out, next_due

    def _settle(self, delivery: Delivery) -> tuple[_Queue, Message, int] | None:
        """Take the delivery out of flight; None if this consumer no longer
        holds it (settled already, or handed back): then settling is a no-op,
        as on every provider."""
        tag = delivery.tag
        assert isinstance(tag, int)
        if tag not in self._mine:
            return None
        q = self._broker.queue(self._queue)
        message, count = q.in_flight.pop(tag)
        self._mine.discard(tag)
        self._broker.notify()
        return q, message, count

    def ack(self, delivery: Delivery) -> None:
        with self._broker.lock:
            self._settle(delivery)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: the sends and the acks under one lock."""
        for queue, m in sends:
            if len(m.body) > self._limit:
                raise MessageTooLarge(len(m.body), self._limit, queue)
        with self._broker.lock:
            for queue, m in sends:
                self._broker.put(queue, m)
            for d in acks:
                if d.tag in self._mine:
                    self._settle(d)
            self._broker.notify()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._broker.lock:
            if (held := self._settle(delivery)) is not None:
                q, message, count = held
                q.dead.append(DeadLetter(message, count, reason, now_ms()))

    def release(self, delivery: Delivery) -> None:
        with self._broker.lock:
            if (held := self._settle(delivery)) is not None:
                q, message, count = held
                q.ready.appendleft((message, count))

    def close(self) -> None:
        with self._broker.lock:
            q = self._broker.queues.get(self._queue)
            for tag in sorted(self._mine, reverse=True):
                if q is not None and tag in q.in_flight:
                    q.ready.appendleft(q.in_flight.pop(tag))
            self._mine.clear()
            self._broker.notify()


# -- browser ---------------------------------------------------------------


class MemoryBrowser:
    def __init__(self, broker: _Broker, queue: str) -> None:
        self._broker = broker
        self._queue = queue

    def peek(self, limit: int) -> Sequence[Message]:
        with self._broker.lock:
            q = self._broker.queue(self._queue)
            self._broker.promote(q)
            return [m for m, _ in itertools.islice(q.ready, limit)]

    def stats(self) -> QueueStats:
        with self._broker.lock:
            q = self._broker.queue(self._queue)
            self._broker.promote(q)
            return QueueStats(len(q.ready), len(q.in_flight), len(q.delayed), len(q.dead))

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        with self._broker.lock:
            return list(self._broker.queue(self._queue).dead[:limit])

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        with self._broker.lock:
            q = self._broker.queue(self._queue)
            chosen = [d for d in q.dead if ids is None or d.message.id in ids]
            q.dead = [d for d in q.dead if not (ids is None or d.message.id in ids)]
            for d in chosen:
                q.ready.append((d.message, 0))
            self._broker.notify()
            return len(chosen)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        with self._broker.lock:
            q = self._broker.queue(self._queue)
            before = len(q.dead)
            q.dead = [d for d in q.dead if not (ids is None or d.message.id in ids)]
            return before - len(q.dead)

    def purge(self) -> int:
        with self._broker.lock:
            q = self._broker.queue(self._queue)
            n = len(q.ready) + len(q.delayed)
            q.ready.clear()
            q.delayed.clear()
            return n

    def close(self) -> None:
        pass


# -- the native async route (kew.aio) ----------------------------------------
#
# The in-process structures are only ever held for microseconds, so the
# async objects call the sync ones inline; only the wait of a fetch is
# async, on the consumer's own asyncio.Event.


class _Waiter:
    """An async fetch waiting on its loop: ``wake`` may come from any thread."""

    __slots__ = ("event", "loop", "thread")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.event = asyncio.Event()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
            return
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class MemoryAsyncConnector:
    """``MemoryConnector.aio()``: the same broker, awaited."""

    def __init__(self, sync: MemoryConnector) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks = sync.lacks

    def __repr__(self) -> str:
        return f"MemoryAsyncConnector({self.url!r})"

    async def declare(self, queue: str) -> None:
        self.sync.declare(queue)

    async def producer(self, queue: str) -> MemoryAsyncProducer:
        return MemoryAsyncProducer(self.sync.producer(queue))

    async def consumer(self, queue: str, prefetch: int) -> MemoryAsyncConsumer:
        return MemoryAsyncConsumer(self.sync.consumer(queue, prefetch))

    async def browser(self, queue: str) -> MemoryAsyncBrowser:
        return MemoryAsyncBrowser(self.sync.browser(queue))

    async def delete(self, queue: str) -> None:
        self.sync.delete(queue)

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: the sync one, inline (microseconds under a lock)."""
        self.sync.send_to(sends)

    async def close(self) -> None:
        self.sync.close()


class MemoryAsyncProducer:
    def __init__(self, sync: MemoryProducer) -> None:
        self._sync = sync

    async def send(self, message: Message) -> None:
        self._sync.send(message)

    async def send_many(self, messages: Sequence[Message]) -> None:
        self._sync.send_many(messages)

    async def close(self) -> None:
        self._sync.close()


class MemoryAsyncConsumer:
    def __init__(self, sync: MemoryConsumer) -> None:
        self._sync = sync
        self._waiter: _Waiter | None = None

    async def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` (the sync consumer's
        ``set_prefetch``: a bound, no I/O)."""
        self._sync.set_prefetch(count)

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._waiter is None or self._waiter.loop is not loop:
            self._waiter = _Waiter()
        waiter, b = self._waiter, self._sync._broker
        while True:
            with b.lock:
                out, next_due = self._sync._take(max_count)
                if out:
                    return out
                waiter.event.clear()  # under the lock: a wake from now on sets it
                b.waiters.add(waiter)
            try:
                left = deadline - loop.time()
                if left <= 0:
                    return []
                async with asyncio.timeout(min(left, next_due) if next_due is not None else left):
                    await waiter.event.wait()
            except TimeoutError:
                pass
            finally:
                with b.lock:
                    b.waiters.discard(waiter)

    async def ack(self, delivery: Delivery) -> None:
        self._sync.ack(delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._sync.dead_letter(delivery, reason)

    async def release(self, delivery: Delivery) -> None:
        self._sync.release(delivery)

    async def close(self) -> None:
        self._sync.close()


class MemoryAsyncBrowser:
    def __init__(self, sync: MemoryBrowser) -> None:
        self._sync = sync

    async def peek(self, limit: int) -> Sequence[Message]:
        return self._sync.peek(limit)

    async def stats(self) -> QueueStats:
        return self._sync.stats()

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return self._sync.dead_letters(limit)

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return self._sync.requeue_dead(ids)

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return self._sync.purge_dead(ids)

    async def purge(self) -> int:
        return self._sync.purge()

    async def close(self) -> None:
        self._sync.close()


# -- dedupe store (kew.idempotency) ------------------------------------------


class MemoryDedupeStore:
    """Records in a dict of the broker, under its lock.  ``atomic_once``
    runs its effect (given ``None``) under that lock, then marks the key."""

    def __init__(self, broker: _Broker, namespace: str) -> None:
        self.namespace = namespace
        self._lock = broker.lock
        # (done, token, until): done and until None = for ever
        with broker.lock:
            self._records = broker.once.setdefault(namespace, {})

    def _live(self, key: str) -> tuple[bool, str | None, int | None] | None:
        r = self._records.get(key)
        if r is not None and r[2] is not None and r[2] <= now_ms():
            del self._records[key]
            return None
        return r

    def claim(self, key: str, token: str, lease_ms: int) -> ClaimResult:
        with self._lock:
            r = self._live(key)
            if r is not None and r[0]:
                return ClaimResult.DONE
            if r is not None and r[1] != token:
                return ClaimResult.HELD
            self._records[key] = (False, token, now_ms() + lease_ms)
            return ClaimResult.CLAIMED

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        with self._lock:
            r = self._live(key)
            if r is None or r[0] or r[1] != token:
                return False
            self._records[key] = (False, token, now_ms() + lease_ms)
            return True

    def _done(self, key: str, retain_ms: int | None) -> None:
        self._records[key] = (True, None, None if retain_ms is None else now_ms() + retain_ms)

    def complete(self, key: str, token: str, retain_ms: int | None) -> bool:
        with self._lock:
            r = self._live(key)
            self._done(key, retain_ms)
            return r is None or (not r[0] and r[1] == token)

    def release(self, key: str, token: str) -> None:
        with self._lock:
            r = self._live(key)
            if r is not None and not r[0] and r[1] == token:
                del self._records[key]

    def atomic_once(
        self, key: str, effect: Callable[[None], object], retain_ms: int | None
    ) -> bool:
        with self._lock:
            r = self._live(key)
            if r is not None and r[0]:
                return False
            effect(None)
            self._done(key, retain_ms)
            return True

    def state(self, key: str) -> str | None:
        with self._lock:
            r = self._live(key)
        return None if r is None else "done" if r[0] else "claimed"

    def forget(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)

    def purge_expired(self) -> int:
        with self._lock:
            before = len(self._records)
            for key in list(self._records):
                self._live(key)
            return before - len(self._records)

    def close(self) -> None:
        pass


def connect(url: str) -> MemoryConnector:
    return MemoryConnector(url)
