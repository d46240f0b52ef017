"""The clients of the Redis provider's native async route: redis.asyncio
(its ``RedisCluster`` on Cluster), one per event loop, every call retried
and translated into kew's errors as :class:`kew_redis._client.Client` does
for the sync provider (whose translation it uses)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis
from redis.exceptions import RedisClusterException

from kew.qchan.spi import BrokerUnavailable, KewError
from kew.qchan.spi.kit import Backoff
from kew_redis._client import Client

__all__ = ["AsyncClient", "PerLoop"]

R = TypeVar("R")
T = TypeVar("T")


class PerLoop(Generic[T]):
    """One value per event loop (and process), made by ``make()`` at its
    first use there: a redis.asyncio client and a group commit belong to
    the loop that made them.  (kew.task's ``submit_async`` sends through one
    async connector from whatever loop it runs on.)"""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()  # loops of other threads
        self._pid = os.getpid()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        #: The last one given: its loop, process and value (most calls ask for it).
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], int, T] | None = None

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        last = self._last  # (one read: other threads may change it)
        if last is not None and last[0]() is loop and last[1] == os.getpid():
            return last[2]
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's are dropped unused
                self._by_loop = weakref.WeakKeyDictionary()
                self._pid = os.getpid()
            value = self._by_loop.get(loop)
            if value is None:
                value = self._by_loop[loop] = self._make()
            self._last = (weakref.ref(loop), self._pid, value)
            return value

    def take(self) -> list[tuple[asyncio.AbstractEventLoop, T]]:
        """Every value made in this process, with its loop; forgotten here."""
        with self._lock:
            found = list(self._by_loop.items()) if self._pid == os.getpid() else []
            self._by_loop = weakref.WeakKeyDictionary()
            self._last = None
            return found


class AsyncClient:
    """The redis.asyncio clients of a connector or a consumer, one per event
    loop.  :meth:`call` retries and translates as the sync
    :meth:`Client.call <kew_redis._client.Client.call>` does."""

    def __init__(self, sync: Client) -> None:
        self.sync = sync  # its options, URL and translation (no I/O)
        self.options = sync.options
        self._clients: PerLoop[Any] = PerLoop(self.options.aio_client)

    def get(self) -> Any:
        """The client of the running loop (made at its first use: no I/O)."""
        return self._clients.get()

    async def call(
        self,
        fn: Callable[[Any], Awaitable[R]],
        *,
        refused: type[KewError] = BrokerUnavailable,
    ) -> R:
        """``await fn(client)``, retried on a passing fault; kew's errors
        only.  ``fn`` does the whole operation (a retry runs it again)."""
        backoff = Backoff()
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await fn(self.get())
            except (redis.RedisError, RedisClusterException) as e:
                final = self.sync.translate(e, refused)
                if final is None and attempts <= self.options.retries:
                    await asyncio.sleep(backoff.delay())
                    continue
                raise (final or self.unreachable(e, attempts, started)) from e

    def unreachable(self, e: BaseException, attempts: int, started: float) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"Redis at {self.sync.url} is unreachable after {attempts} attempt(s) "
            f"in {time.monotonic() - started:.1f} s: {e}"
        )

    async def close(self) -> None:
        """Close the client of this loop, and those of other loops still
        running (on their loops)."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, r in self._clients.take():
            if loop is here:
                await _quietly(r)
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    asyncio.run_coroutine_threadsafe(_quietly(r), loop)


async def _quietly(r: Any) -> None:
    closing = getattr(r, "aclose", None) or r.close  # (aclose: redis-py 5.0.1 and later)
    with contextlib.suppress(redis.RedisError, RedisClusterException, OSError):
        await closing()
