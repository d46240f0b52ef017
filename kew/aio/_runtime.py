"""The asyncio consumer runtime: :class:`Subscription`, the async twin of
:class:`kew.qchan.runtime.Subscription`.

One fetch task keeps at most ``prefetch`` deliveries unsettled and hands
them to ``concurrency`` worker coroutines, which run the handler; the
handler settles each delivery (the queue's sink acks after the user's
coroutine returns, dead-letters with the traceback if it raises).  Whatever
else escapes a handler is logged and the delivery handed back: nothing is
lost and the workers never die.  ``stop(grace)`` stops fetching, hands back
what has not started, waits up to ``grace`` seconds for running handlers,
cancels those still running (their deliveries are handed back when the
consumer closes), then closes the consumer.

Liveness tells the truth as in the sync runtime: ``alive`` is False once
the fetch task ended, the consumer failed for good (``ConsumerFailed``), or
fetches have failed for longer than ``stall_after``; ``await healthy()``
also says False when work waited on the broker that long while there was
room and nothing was delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

from kew.qchan._liveness import STALL_AFTER, Liveness
from kew.qchan.spi import ConsumerFailed, Delivery
from kew.qchan.spi.aio import AsyncConsumer

__all__ = ["AsyncHandler", "Subscription"]

log = logging.getLogger("kew.consumer")

AsyncHandler = Callable[[AsyncConsumer, Delivery], Awaitable[None]]
"""Processes one delivery and settles it through the consumer."""

#: Subscriptions running: asyncio keeps only weak references to tasks, and a
#: subscription nobody holds (``q.sink(h)`` as a statement) must keep running.
_RUNNING: set[Subscription] = set()


class Subscription:
    """A running asyncio consumer (``kew.aio.Queue.sink``).

    It starts at once, on the running loop.  ``await sub`` waits until it
    runs (and raises if it could not start); ``async with`` does that and
    stops it on exit; else call :meth:`stop`.
    """

    def __init__(
        self,
        open_consumer: Callable[[int], Awaitable[AsyncConsumer]],
        handler: AsyncHandler,
        *,
        name: str,
        concurrency: int = 1,
        prefetch: int | None = None,
        poll_interval: float = 0.5,
        waiting: Callable[[], Awaitable[int]] | None = None,
        stall_after: float = STALL_AFTER,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        prefetch = prefetch or concurrency
        if prefetch < concurrency:
            raise ValueError(f"prefetch ({prefetch}) must be >= concurrency ({concurrency})")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"a kew.aio subscription of {name!r} starts on the running event loop: "
                "make it from a coroutine (or use kew.Queue.sink, the sync API)"
            ) from None
        self.name = name
        self.concurrency = concurrency
        self.prefetch = prefetch
        self._handler = handler
        self._poll = poll_interval
        self._waiting = waiting
        self._live = Liveness(name, poll_interval, stall_after)  # (shared with kew.qchan)
        self._refill = max(1, prefetch // 4)
        self._pending: deque[Delivery] = deque()  # fetched, not started
        self._running = 0  # started, not finished
        self._stopping = False
        self._consumer: AsyncConsumer | None = None
        self._room_freed = asyncio.Event()
        self._work = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self.handled = 0
        _RUNNING.add(self)
        self._stop_task: asyncio.Task[bool] | None = None
        self._started = loop.create_task(self._start(open_consumer), name=f"kew-start-{name}")
        self._started.add_done_callback(self._start_done)

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("kew: the subscription of %s could not start: %s", self.name, e)

    async def _start(self, open_consumer: Callable[[int], Awaitable[AsyncConsumer]]) -> None:
        try:
            self._consumer = await open_consumer(self.prefetch)
        except BaseException as e:
            self._live.error = e
            _RUNNING.discard(self)
            raise
        if self._stopping:  # stopped while opening: stop() closes the consumer
            return
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"kew-fetch-{self.name}")
        self._workers = [
            asyncio.create_task(self._work_loop(), name=f"kew-work-{self.name}-{i}")
            for i in range(self.concurrency)
        ]
        for task in (self._fetcher, *self._workers):
            task.add_done_callback(self._task_done)

    def _task_done(self, _: asyncio.Task[None]) -> None:
        # Every task ended (stopped, or cancelled with its loop): nothing to keep alive.
        if all(t.done() for t in (self._fetcher, *self._workers) if t is not None):
            _RUNNING.discard(self)

    def __await__(self) -> Generator[Any, None, Subscription]:
        return self._wait_started().__await__()

    async def _wait_started(self) -> Subscription:
        await asyncio.shield(self._started)
        return self

    async def __aenter__(self) -> Subscription:
        return await self._wait_started()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Deliveries held: fetched and not yet settled."""
        return len(self._pending) + self._running

    @property
    def error(self) -> BaseException | None:
        """Why the consumer failed for good (``ConsumerFailed``), or could
        not be opened; else None."""
        return self._live.error

    @property
    def last_fetch(self) -> float:
        """When (``time.monotonic()``) the fetch task last fetched or looked."""
        return self._live.last_fetch

    @property
    def last_delivery(self) -> float:
        """When (``time.monotonic()``) a fetch last brought deliveries."""
        return self._live.last_delivery

    @property
    def stall_after(self) -> float:
        """Seconds of failing fetches, or of work left waiting undelivered
        while there was room, after which this subscription is no longer
        alive / healthy."""
        return self._live.stall_after

    @stall_after.setter
    def stall_after(self, seconds: float) -> None:
        self._live.stall_after = seconds

    @property
    def alive(self) -> bool:
        """The fetch task is running, has polled recently, its consumer has
        not failed for good, and its fetches have not been failing for
        longer than ``stall_after``.  Asks the broker nothing."""
        fetcher = self._fetcher
        return self._live.alive(not self._stopping and fetcher is not None and not fetcher.done())

    async def healthy(self) -> bool:
        """``alive``, and not stalled: work has not been waiting on the broker
        for longer than ``stall_after`` while this subscription had room and
        delivered nothing (asks the broker for the ready count)."""
        return self.alive and not await self._stalled()

    async def _stalled(self) -> bool:
        if self._waiting is None or self._live.busy(self.in_flight >= self.prefetch):
            return False
        try:
            waiting: int | None = await self._waiting()
        except Exception as e:  # the broker cannot tell: fetch failures say the rest
            log.debug("kew: cannot count what waits on %s: %s", self.name, e)
            waiting = None
        return self._live.stalled(waiting)

    # -- loops ------------------------------------------------------------

    def _room(self) -> int:
        """How many deliveries to fetch now: the room under ``prefetch``
        once it is worth a fetch (as in the sync runtime), else 0."""
        room = self.prefetch - len(self._pending) - self._running
        if room <= 0:
            return 0
        if room >= self._refill or len(self._pending) + self._running < self.concurrency:
            return room
        return 0

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        while not self._stopping and self._live.error is None:
            room = self._room()
            if not room:
                self._room_freed.clear()
                try:
                    async with asyncio.timeout(self._poll):
                        await self._room_freed.wait()
                except TimeoutError:
                    pass
                self._live.polled()
                continue
            batch = await self._fetch(self._consumer, room)
            if batch:
                async with self._work:
                    self._pending.extend(batch)
                    self._work.notify(len(batch))

    async def _fetch(self, consumer: AsyncConsumer, most: int) -> Sequence[Delivery]:
        """Up to ``most`` deliveries; none if the fetch failed (logged, and
        after a pause)."""
        try:
            batch = await consumer.fetch(most, self._poll)
        except ConsumerFailed as e:
            self._live.failed_for_good(e)
            return ()
        except Exception as e:
            self._live.failed(e)
            await asyncio.sleep(1.0)
            return ()
        self._live.fetched(len(batch))
        return batch

    async def _work_loop(self) -> None:
        while True:
            async with self._work:
                await self._work.wait_for(lambda: bool(self._pending) or self._stopping)
                if not self._pending:
                    return
                delivery = self._pending.popleft()
                self._running += 1
            try:
                await self._run(delivery)
            finally:
                self._running -= 1
                self.handled += 1
                self._room_freed.set()

    async def _run(self, delivery: Delivery) -> None:
        assert self._consumer is not None
        try:
            await self._handler(self._consumer, delivery)
        except Exception:
            log.exception("kew: handler for %s failed outside the sink; handing back", self.name)
            await self._settle_safely(self._consumer.release, delivery)

    async def _settle_safely(
        self, settle: Callable[[Delivery], Awaitable[None]], delivery: Delivery
    ) -> None:
        try:
            await settle(delivery)
        except Exception:
            log.exception(
                "kew: settling a delivery on %s failed; it will be redelivered", self.name
            )

    # -- stopping ---------------------------------------------------------

    async def stop(self, grace: float = 30.0) -> bool:
        """Stop; wait up to ``grace`` seconds for running handlers.

        Deliveries not yet started are handed back at once; handlers still
        running after the grace period are cancelled, and their deliveries
        handed back when the consumer closes.  Returns True if every handler
        finished in time.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name=f"kew-stop-{self.name}")
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> bool:
        self._stopping = True
        await asyncio.wait([self._started])  # (if it never ran, error says why)
        consumer = self._consumer
        if self._fetcher is not None:
            self._fetcher.cancel()  # a cancelled fetch keeps nothing (the async SPI)
            await asyncio.gather(self._fetcher, return_exceptions=True)
        async with self._work:
            pending = list(self._pending)
            self._pending.clear()
            self._work.notify_all()
        if consumer is not None:
            for delivery in pending:
                await self._settle_safely(consumer.release, delivery)
        finished = True
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=max(0.0, grace))
            finished = not late
            for task in late:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        if consumer is not None:
            try:
                await consumer.close()
            except Exception:
                log.exception("kew: closing the consumer of %s failed", self.name)
        _RUNNING.discard(self)
        return finished
