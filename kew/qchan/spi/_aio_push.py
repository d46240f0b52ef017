"""What a native async consumer built on its sync consumer's own threads
shares (RabbitMQ's and STOMP's): the provider subclasses its sync consumer
with :class:`LoopWaker` (its threads tell the event loop what happens) and
wraps that core in a :class:`PushConsumer` (what the loop awaits).  Each
provider keeps only its broker's tricks: how a delivery is taken from the
buffer, settled, and how the threads are stopped.

* **The loop is woken, not polled.**  A fetch finding the buffer empty arms
  a flag and awaits an ``asyncio.Event``; the provider's thread, putting a
  delivery in the buffer (or the consumer failing for good), sets it
  through ``loop.call_soon_threadsafe``, once per armed wait, not per
  delivery.  Taking from the buffer never blocks.
* **A cancelled fetch keeps nothing**: it takes from the buffer only after
  its last await, and returns what it took in the same step; cancelled
  while it waits, it has taken nothing, and what arrives stays buffered for
  the next fetch (or comes again from the broker once the consumer closes).
* **Start and close are awaited**: the subscription (or why it could not)
  and the end of the consumer's thread come to the loop as futures; the
  loop never waits on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from kew.qchan.spi import Delivery

__all__ = ["LoopWaker", "PushConsumer", "set_done", "subscribed"]


def set_done(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` unless it is done (its awaiting coroutine was
    cancelled): on the loop, through :meth:`LoopWaker._to_loop`."""
    if not future.done():
        future.set_result(None)


class LoopWaker:
    """Mixed into a sync consumer (before it in the bases) whose threads
    tell ``loop`` when it subscribed (``_up``), when a delivery arrives for a
    waiting fetch (:meth:`_wake`), and when its thread ended (``_down``).
    The subclass calls :meth:`_wake_to` before the base constructor starts
    the threads, and resolves ``_up`` and ``_down`` from them."""

    def _wake_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start telling ``loop`` (before the consumer's threads start)."""
        self._loop = loop
        self._up: asyncio.Future[None] = loop.create_future()  # subscribed, or failed
        self._down: asyncio.Future[None] = loop.create_future()  # the thread ended
        self._arrived = asyncio.Event()
        self._armed = False  # a fetch waits on _arrived

    def _wait_started(self) -> None:
        """Not here: :func:`subscribed` awaits ``_up``."""

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the loop, soon (nothing once the loop is closed:
        nobody waits)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _wake(self) -> None:
        """A waiting fetch (if one is armed) looks at the buffer again."""
        if self._armed:
            self._armed = False
            self._to_loop(self._arrived.set)

    def _wake_failed(self) -> None:
        """The consumer failed for good: a fetch waiting now raises it."""
        self._armed = True
        self._wake()


class Core(Protocol):
    """What :func:`subscribed` and :class:`PushConsumer` use of a sync
    consumer mixed with :class:`LoopWaker`."""

    reconnects: int
    _pid: int
    _thread: threading.Thread
    _up: asyncio.Future[None]
    _down: asyncio.Future[None]
    _arrived: asyncio.Event
    _armed: bool

    def _check(self) -> None: ...

    def _raise_start_error(self) -> None: ...

    def stop(self) -> None: ...


C = TypeVar("C", bound=Core)


async def subscribed(core: Core, timeout: float | None = None) -> None:
    """Await the core's subscription (at most ``timeout`` seconds, then it
    has not started) and raise as the sync constructor does if it could
    not start; raising or cancelled, the core is stopped (its thread ends
    by itself)."""
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(core._up)
        core._raise_start_error()
    except BaseException:
        core.stop()
        raise


class PushConsumer(Generic[C]):
    """The ``AsyncConsumer`` half a provider's consumer shares: ``fetch``
    (the module's promises) over :meth:`_take`, the provider's."""

    #: Longest ``close`` waits for the consumer's thread (as the sync close).
    CLOSE_WAIT = 10.0

    def __init__(self, core: C) -> None:
        self._core = core
        self._closed = False

    @property
    def reconnects(self) -> int:
        """Connections lost and made again (the sync consumer's count)."""
        return self._core.reconnects

    def _take(self, most: int) -> list[Delivery]:
        """Up to ``most`` deliveries of the buffer, without waiting or
        awaiting.  The provider's."""
        raise NotImplementedError

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        """What arrived, else what arrives within ``timeout`` seconds, waiting
        on the loop; ``ConsumerFailed`` once the consumer failed for good."""
        core = self._core
        core._check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            core._arrived.clear()
            core._armed = True  # from here on, a delivery (or a failure) sets _arrived
            got = self._take(max_count)
            if got:
                core._armed = False
                return got  # no await after the take: a cancel cannot strand these
            core._check()
            left = deadline - loop.time()
            if left <= 0 or self._closed:
                core._armed = False
                return []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await core._arrived.wait()

    async def _stop_core(self) -> None:
        """Stop the core and await its thread's end (at most
        ``CLOSE_WAIT``; not in a child of ``os.fork``, where it never ran)."""
        core = self._core
        core.stop()
        if core._pid == os.getpid() and core._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.CLOSE_WAIT):
                    await asyncio.shield(core._down)
