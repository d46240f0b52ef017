"""The asyncio consumer runtime: :class:`Subscription`, the async twin of
:class:`kew.qchan.runtime.Subscription`.

One fetch task keeps at most ``window`` deliveries unsettled and hands them
to ``concurrency`` worker coroutines, which run the handler.  The window is
``prefetch`` when given, else it adapts as in the sync runtime, with the
same policy (:class:`kew.qchan._window.WindowPolicy`): the concurrency for
long handlers, more for short ones (up to ``kew.qchan._window.cap``), when
the consumer's window can change (:class:`AsyncWindowedConsumer`), and the
concurrency when it cannot.

The handler settles each delivery, or returns True to have it acked (the
queue's sink does, after the user's coroutine returns): while the window
exceeds the concurrency the ack is handed to the subscription's ack task
and the worker takes the next delivery at once; the ack task commits every
ack handed over meanwhile together (one await each, concurrently: the
providers share their round trips), and a delivery whose ack failed is
handed back.  The delivery stays counted as held until its ack is done.
With a window of the concurrency each ack is awaited by its worker.

Whatever else escapes a handler is logged and the delivery handed back:
nothing is lost and the workers never die.  ``stop(grace)`` stops fetching,
hands back what has not started, waits up to ``grace`` seconds for running
handlers and acks, cancels the handlers still running (their deliveries are
handed back when the consumer closes), then closes the consumer.

Liveness tells the truth as in the sync runtime: ``alive`` is False once
the fetch task ended, the consumer failed for good (``ConsumerFailed``), or
fetches have failed for longer than ``stall_after``; ``await healthy()``
also says False when work waited on the broker that long while there was
room and nothing was delivered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

from kew.qchan._liveness import STALL_AFTER, Liveness
from kew.qchan._window import Window, WindowPolicy
from kew.qchan.spi import ConsumerFailed, Delivery
from kew.qchan.spi.aio import AsyncBatchAcker, AsyncConsumer, AsyncWindowedConsumer

# (AsyncBatchAcker and AsyncWindowedConsumer: the SPI's, kew.qchan.spi.aio)
__all__ = [
    "AsyncBatchAcker",
    "AsyncHandler",
    "AsyncWindowedConsumer",
    "Subscription",
]

log = logging.getLogger("kew.consumer")

AsyncHandler = Callable[[AsyncConsumer, Delivery], Awaitable[object]]
"""Processes one delivery and settles it through the consumer, or returns
True to have the subscription ack it (grouped while the window exceeds the
concurrency)."""

#: Seconds a worker runs deliveries (handlers that never wait) before it
#: lets the loop take a turn.
_TURN = 0.002

#: Subscriptions running: asyncio keeps only weak references to tasks, and a
#: subscription nobody holds (``q.sink(h)`` as a statement) must keep running.
_RUNNING: set[Subscription] = set()


def _windowed(consumer: AsyncConsumer) -> AsyncWindowedConsumer | None:
    if isinstance(consumer, AsyncWindowedConsumer) and inspect.iscoroutinefunction(
        consumer.set_prefetch
    ):
        return consumer
    return None


class Subscription:
    """A running asyncio consumer (``kew.aio.Queue.sink``).

    It starts at once, on the running loop.  ``await sub`` waits until it
    runs (and raises if it could not start); ``async with`` does that and
    stops it on exit; else call :meth:`stop`.  ``prefetch`` pins the window;
    without it the window adapts (:attr:`window`).
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
        if prefetch is not None and prefetch < concurrency:
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
        self._pinned = prefetch is not None
        self._win = Window(name, concurrency, prefetch)
        self._windowed: AsyncWindowedConsumer | None = None
        self._handler = handler
        self._poll = poll_interval
        self._waiting = waiting
        self._live = Liveness(name, poll_interval, stall_after)  # (shared with kew.qchan)
        self._pending: deque[Delivery] = deque()  # fetched, not started
        self._running = 0  # started, not finished
        self._settling = 0  # finished, its ack handed over and not yet done
        self._acks: deque[tuple[Delivery, float]] = deque()  # handed over, not committed
        self._acks_ready = asyncio.Event()
        self._acks_closing = False
        self._acks_inline = True  # acks do not wait on the broker (so far: _commit)
        self._stopping = False
        self._consumer: AsyncConsumer | None = None
        self._room_freed = asyncio.Event()
        self._ticker: asyncio.TimerHandle | None = None
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for work
        self._idle_since: float | None = None  # since when a worker waits for a fetch
        self._workers: list[asyncio.Task[None]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self.handled = 0
        #: Ack groups committed, and the acks they committed (statistics).
        self.commits = self.acked = 0
        _RUNNING.add(self)
        self._stop_task: asyncio.Task[bool] | None = None
        self._started = loop.create_task(self._start(open_consumer), name=f"kew-start-{name}")
        self._started.add_done_callback(self._start_done)

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("kew: the subscription of %s could not start: %s", self.name, e)

    async def _start(self, open_consumer: Callable[[int], Awaitable[AsyncConsumer]]) -> None:
        try:
            consumer = self._consumer = await open_consumer(self._win.size)
        except BaseException as e:
            self._live.error = e
            _RUNNING.discard(self)
            raise
        if self._stopping:  # stopped while opening: stop() closes the consumer
            return
        if not self._pinned and (windowed := _windowed(consumer)) is not None:
            self._win.policy = WindowPolicy(self.concurrency)
            self._windowed = windowed
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"kew-fetch-{self.name}")
        self._acker = asyncio.create_task(self._ack_loop(), name=f"kew-ack-{self.name}")
        self._workers = [
            asyncio.create_task(self._work_loop(), name=f"kew-work-{self.name}-{i}")
            for i in range(self.concurrency)
        ]
        for task in (self._fetcher, self._acker, *self._workers):
            task.add_done_callback(self._task_done)

    def _task_done(self, _: asyncio.Task[None]) -> None:
        # Every task ended (stopped, or cancelled with its loop): nothing to keep alive.
        tasks = (self._fetcher, self._acker, *self._workers)
        if all(t.done() for t in tasks if t is not None):
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
        """Deliveries held: fetched and not yet settled (acks under way
        included)."""
        return len(self._pending) + self._running + self._settling

    @property
    def window(self) -> int:
        """Deliveries this subscription holds at most now: ``prefetch`` when
        it was given, else the adaptive window (the concurrency while
        handlers are long or the consumer's window cannot change; up to
        ``kew.qchan._window.cap`` for short handlers), as the sync
        ``Subscription.window``."""
        return self._win.size

    @property
    def prefetch(self) -> int:
        """The same as :attr:`window` (its older name)."""
        return self._win.size

    @property
    def adaptive(self) -> bool:
        """The window adapts to the handlers (no ``prefetch`` was given, and
        the consumer's window can change: :class:`AsyncWindowedConsumer`)."""
        return self._win.policy is not None

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
        if self._waiting is None or self._live.busy(self.in_flight >= self._win.size):
            return False
        try:
            waiting: int | None = await self._waiting()
        except Exception as e:  # the broker cannot tell: fetch failures say the rest
            log.debug("kew: cannot count what waits on %s: %s", self.name, e)
            waiting = None
        return self._live.stalled(waiting)

    # -- the window -------------------------------------------------------

    def _room(self) -> int:
        """How many deliveries to fetch now (as in the sync runtime:
        :meth:`kew.qchan._window.Window.room`)."""
        return self._win.room(len(self._pending) + self._running, self._settling)

    def _wake(self) -> None:
        """After a delivery is finished or settled: wake the fetch task if it
        has something to fetch now (not at every delivery)."""
        if self._room():
            self._room_freed.set()

    async def _resize(self, old: int, new: int) -> None:
        """Ask the consumer for the window ``new`` (it may take a round
        trip), which :meth:`kew.qchan._window.Window.adapt` decided."""
        assert self._windowed is not None
        try:
            await self._windowed.set_prefetch(new)
        except Exception as e:
            self._win.refused(old, new, e)
            return
        self._win.granted(old, new)

    # -- loops ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        policy = self._win.policy
        self._tick()  # (a wait for room ends every poll_interval: liveness, the policy)
        try:
            while not self._stopping and self._live.error is None:
                resize = self._win.adapt(self._running)
                if resize:
                    await self._resize(*resize)
                    continue
                room = self._room()
                if not room:
                    self._room_freed.clear()
                    await self._room_freed.wait()
                    self._live.polled()
                    continue
                batch = await self._fetch(consumer, room)
                if not batch:
                    continue
                if policy is not None:
                    policy.delivered(len(batch), sum(len(d.message.body) for d in batch))
                    if self._idle_since is not None:  # a worker waited for these: the refill
                        policy.fetched(min(time.monotonic() - self._idle_since, self._poll))
                self._idle_since = None
                self._pending.extend(batch)
                self._hand_out(len(batch))
        finally:
            if self._ticker is not None:
                self._ticker.cancel()

    def _tick(self) -> None:
        """Wake the fetch task now and every ``poll_interval`` (one timer,
        not one per wait)."""
        self._room_freed.set()
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self._poll, self._tick)

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
        pending, idle = self._pending, self._idle
        loop = asyncio.get_running_loop()
        turn = loop.time()
        while True:
            while pending:
                delivery = pending.popleft()
                self._running += 1
                await self._run(delivery)
                # Handlers that never wait would hold the loop for a whole
                # window: a turn of the loop for the others every few ms.
                if loop.time() - turn >= _TURN:
                    await asyncio.sleep(0)
                    turn = loop.time()
            if self._stopping:
                return
            if self._idle_since is None:
                self._idle_since = time.monotonic()
            waiter = loop.create_future()
            idle.append(waiter)
            await waiter  # (set by _hand_out or stop)
            turn = loop.time()

    def _hand_out(self, count: int) -> None:
        """Wake up to ``count`` idle workers (all when stopping)."""
        idle = self._idle
        while idle and (count > 0 or self._stopping):
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def _run(self, delivery: Delivery) -> None:
        consumer = self._consumer
        assert consumer is not None
        start = time.monotonic()
        took: float | None = None  # the handler's time (not its ack's)
        ack = False
        try:
            ack = await self._handler(consumer, delivery) is True
            took = time.monotonic() - start
            if ack and not self._win.grouped:
                # No slack for deliveries settling: at once, by this worker.
                ack = False
                await consumer.ack(delivery)
        except Exception:
            log.exception("kew: handler for %s failed outside the sink; handing back", self.name)
            await self._settle_safely(consumer.release, delivery)
        finally:
            if ack:  # held until its ack is done
                self._settling += 1
                self._acks.append((delivery, time.monotonic()))
                self._acks_ready.set()
            self._running -= 1
            self.handled += 1
            if (policy := self._win.policy) is not None:
                policy.ran(time.monotonic() - start if took is None else took)
            self._wake()

    async def _ack_loop(self) -> None:
        """Commit the acks handed over, in groups: those handed over while
        a group is under way go in the next one."""
        consumer = self._consumer
        assert consumer is not None
        acks, ready = self._acks, self._acks_ready
        while True:
            if not acks:
                if self._acks_closing:
                    return
                ready.clear()
                await ready.wait()
                continue
            items = list(acks)
            acks.clear()
            deliveries = [d for d, _ in items]
            failed = await self._commit(consumer, deliveries)
            if failed:
                log.error(
                    "kew: acking %d of %d deliveries of %s failed (%s); they will be "
                    "delivered again",
                    len(failed),
                    len(deliveries),
                    self.name,
                    failed[0][1],
                )
                for d, _ in failed:
                    await self._settle_safely(consumer.release, d)
            now = time.monotonic()
            self.commits += 1
            self.acked += len(deliveries) - len(failed)
            self._settling -= len(items)
            if (policy := self._win.policy) is not None:
                policy.settled(sum(now - t for _, t in items) / len(items), len(items))
            self._wake()

    async def _commit(
        self, consumer: AsyncConsumer, deliveries: list[Delivery]
    ) -> list[tuple[Delivery, BaseException]]:
        """Ack ``deliveries``; those whose ack failed, with why.

        One call where the consumer acks many at once (``AsyncBatchAcker``:
        if it fails, the whole group is handed back).  Else, where an ack
        waits on the broker (a round trip, a writer thread)
        they are awaited together, so that the provider puts them in one
        round trip or transaction; where it does not wait (it queues the
        ack for an I/O thread, or settles in memory) one after the other,
        without a task each.  Which it is, the first acks tell: whether the
        loop took a turn while one was awaited."""
        failed: list[tuple[Delivery, BaseException]] = []
        if isinstance(consumer, AsyncBatchAcker) and len(deliveries) > 1:
            try:
                await consumer.ack_many(deliveries)
            except Exception as e:
                failed = [(d, e) for d in deliveries]
            return failed
        rest = deliveries
        if self._acks_inline:
            turned: list[bool] = []
            turn = asyncio.get_running_loop().call_soon(turned.append, True)
            for i, d in enumerate(deliveries):
                try:
                    await consumer.ack(d)
                except Exception as e:
                    failed.append((d, e))
                if turned:  # that ack waited: from now on, together
                    self._acks_inline = False
                    rest = deliveries[i + 1 :]
                    break
            else:
                turn.cancel()
                return failed
        if len(rest) == 1:
            try:
                await consumer.ack(rest[0])
            except Exception as e:
                failed.append((rest[0], e))
        elif rest:
            outcomes = await asyncio.gather(
                *(consumer.ack(d) for d in rest), return_exceptions=True
            )
            for d, outcome in zip(rest, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    failed.append((d, outcome))
        return failed

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
        handed back when the consumer closes; the acks of handlers that
        returned are committed, not handed back.  Returns True if every
        handler (and its ack) finished in time.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name=f"kew-stop-{self.name}")
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> bool:
        self._stopping = True
        deadline = time.monotonic() + max(0.0, grace)
        await asyncio.wait([self._started])  # (if it never ran, error says why)
        consumer = self._consumer
        if self._fetcher is not None:
            self._fetcher.cancel()  # a cancelled fetch keeps nothing (the async SPI)
            await asyncio.gather(self._fetcher, return_exceptions=True)
        pending = list(self._pending)
        self._pending.clear()
        self._hand_out(0)  # (stopping: every idle worker ends)
        if consumer is not None:
            for delivery in pending:
                await self._settle_safely(consumer.release, delivery)
        finished = True
        if self._workers:
            left = max(0.0, deadline - time.monotonic())
            _, late = await asyncio.wait(self._workers, timeout=left)
            finished = not late
            for task in late:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._acker is not None:
            # The acks handed over are committed (at least a second for them).
            self._acks_closing = True
            self._acks_ready.set()
            _, late = await asyncio.wait(
                [self._acker], timeout=max(1.0, deadline - time.monotonic())
            )
            finished = finished and not late and self._settling == 0
            self._acker.cancel()
            await asyncio.gather(self._acker, return_exceptions=True)
        if consumer is not None:
            try:
                await consumer.close()
            except Exception:
                log.exception("kew: closing the consumer of %s failed", self.name)
        _RUNNING.discard(self)
        return finished
