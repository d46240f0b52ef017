"""The thread bridge: an :class:`~kew.qchan.spi.aio.AsyncConnector` over a
sync :class:`~kew.qchan.spi.Connector`.

The route for a provider without a native async one (a third party's, or
one of kew's whose native route is not written yet): every blocking call
runs in a bounded thread pool through ``loop.run_in_executor``, so the event
loop never blocks, but a thread does wait through each round trip.

* Short calls (send, settle, browse, declare) share one pool of
  ``threads`` threads per connector.
* Each consumer's ``fetch`` runs on a thread of its own (a pool of one),
  which keeps the sync SPI's promise that a consumer's fetch is called from
  one thread, and leaves the shared pool free for sends and settles while
  fetches wait.
* A fetch cancelled while its thread is still fetching hands back what that
  fetch returns (the async SPI's promise: cancellation loses nothing).
* A sync consumer whose window can change (``WindowedConsumer``) is bridged
  with an async ``set_prefetch``, for kew.aio's adaptive window.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from kew.qchan.spi import (
    Browser,
    Connector,
    Consumer,
    DeadLetter,
    Delivery,
    Message,
    Producer,
    QueueStats,
    WindowedConsumer,
)

__all__ = ["DEFAULT_THREADS", "BridgeConnector"]

R = TypeVar("R")

log = logging.getLogger("kew.aio")

#: Threads of a bridged connector's shared pool (fetches have their own).
DEFAULT_THREADS = 16


class _Pool:
    """Runs blocking calls off the event loop."""

    def __init__(self, threads: int, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.closed = False

    def shutdown(self) -> None:
        """No more calls; the threads end once idle."""
        self.closed = True
        self.executor.shutdown(wait=False)

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))


class BridgeConnector:
    """A sync connector, awaited through threads (the fallback route)."""

    def __init__(self, sync: Connector, threads: int = DEFAULT_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks = sync.lacks
        self._pool = _Pool(threads, "kew-aio")

    def __repr__(self) -> str:
        return f"BridgeConnector({self.sync!r})"

    async def declare(self, queue: str) -> None:
        await self._pool.run(self.sync.declare, queue)

    async def producer(self, queue: str) -> BridgeProducer:
        return BridgeProducer(self._pool, await self._pool.run(self.sync.producer, queue))

    async def consumer(self, queue: str, prefetch: int) -> BridgeConsumer:
        consumer = await self._pool.run(self.sync.consumer, queue, prefetch)
        if isinstance(consumer, WindowedConsumer):
            return BridgeWindowedConsumer(self._pool, consumer, queue)
        return BridgeConsumer(self._pool, consumer, queue)

    async def browser(self, queue: str) -> BridgeBrowser:
        return BridgeBrowser(self._pool, await self._pool.run(self.sync.browser, queue))

    async def delete(self, queue: str) -> None:
        await self._pool.run(self.sync.delete, queue)

    async def close(self) -> None:
        if self._pool.closed:
            return
        try:
            await self._pool.run(self.sync.close)
        finally:
            self._pool.shutdown()


class BridgeProducer:
    def __init__(self, pool: _Pool, sync: Producer) -> None:
        self._pool = pool
        self._sync = sync

    async def send(self, message: Message) -> None:
        await self._pool.run(self._sync.send, message)

    async def send_many(self, messages: Sequence[Message]) -> None:
        await self._pool.run(self._sync.send_many, messages)

    async def close(self) -> None:
        await self._pool.run(self._sync.close)


class _Handoff:
    """Who gets what a fetch returned: the awaiting task, or (once it was
    cancelled) the release."""

    __slots__ = ("abandoned", "lock", "taken")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.taken: Sequence[Delivery] | None = None


class BridgeConsumer:
    def __init__(self, pool: _Pool, sync: Consumer, queue: str) -> None:
        self._pool = pool
        self._sync = sync
        self._queue = queue
        self._fetcher = _Pool(1, f"kew-aio-fetch-{queue}"[:60])

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        handoff = _Handoff()
        try:
            return await self._fetcher.run(self._fetch, max_count, timeout, handoff)
        except asyncio.CancelledError:
            with handoff.lock:
                handoff.abandoned = True
                late = handoff.taken
            if late:  # fetched, but the task was cancelled before it resumed
                self._fetcher.executor.submit(self._release_all, late)
            raise

    def _fetch(self, max_count: int, timeout: float, handoff: _Handoff) -> Sequence[Delivery]:
        got = self._sync.fetch(max_count, timeout)
        with handoff.lock:
            if not handoff.abandoned:
                handoff.taken = got
                return got
        self._release_all(got)  # nobody awaits this fetch any more
        return ()

    def _release_all(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            try:
                self._sync.release(delivery)
            except Exception:
                log.exception("kew: handing back a delivery of %s failed", self._queue)

    async def ack(self, delivery: Delivery) -> None:
        await self._pool.run(self._sync.ack, delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._pool.run(self._sync.dead_letter, delivery, reason)

    async def release(self, delivery: Delivery) -> None:
        await self._pool.run(self._sync.release, delivery)

    async def close(self) -> None:
        if self._fetcher.closed:
            return
        # On the fetch thread: after a fetch still under way (one cancelled).
        try:
            await self._fetcher.run(self._sync.close)
        finally:
            self._fetcher.shutdown()


class BridgeWindowedConsumer(BridgeConsumer):
    """A bridged consumer whose window can change (its sync one is a
    :class:`~kew.qchan.spi.WindowedConsumer`): kew.aio's adaptive window."""

    async def set_prefetch(self, count: int) -> None:
        """The sync ``set_prefetch``, in the shared pool (it may wait a round trip)."""
        await self._pool.run(cast(WindowedConsumer, self._sync).set_prefetch, count)


class BridgeBrowser:
    def __init__(self, pool: _Pool, sync: Browser) -> None:
        self._pool = pool
        self._sync = sync

    async def peek(self, limit: int) -> Sequence[Message]:
        return await self._pool.run(self._sync.peek, limit)

    async def stats(self) -> QueueStats:
        return await self._pool.run(self._sync.stats)

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return await self._pool.run(self._sync.dead_letters, limit)

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._pool.run(self._sync.requeue_dead, ids)

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._pool.run(self._sync.purge_dead, ids)

    async def purge(self) -> int:
        return await self._pool.run(self._sync.purge)

    async def close(self) -> None:
        await self._pool.run(self._sync.close)
