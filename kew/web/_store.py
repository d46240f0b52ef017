"""The task store from the event loop: every store call kew.web makes runs
here, on one thread of its own (``kew-web-store``).

The task store is a sync API (SQLite, PostgreSQL; a third party's need not
be thread-safe), so its calls leave the event loop, one at a time, in the
order they were asked: what the lock of the threaded front end did, with one
thread instead of a thread per waiting request.  A caller that gives up (a
cancelled request, a timeout) gets its answer no more; a call not started
yet is dropped.

The ``queued`` events a submit records (so that its status URL answers at
once) go in batches (:class:`~kew.qchan._commit.LoopGroupCommit`, as the
submits' own group commit): the submits of one turn of the loop, and those
that come while a batch is being written, share one ``store.apply``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from kew.qchan._commit import LoopGroupCommit
from kew.task.model import TaskEvent

__all__ = ["THREAD_NAME", "StoreThread"]

R = TypeVar("R")

#: The name (prefix) of the store's thread.
THREAD_NAME = "kew-web-store"


class StoreThread:
    """Runs ``fn(store)`` on the store's thread for coroutines; ``store`` is
    read there too (a task app opens its store on first use)."""

    def __init__(self, store: Callable[[], Any]) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._group: LoopGroupCommit[TaskEvent] = LoopGroupCommit(self._apply)
        #: Calls run so far (a statistic, for tests).
        self.calls = 0

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
            return self._executor

    def _call(self, fn: Callable[[Any], R]) -> R:
        self.calls += 1  # (on the one thread)
        return fn(self._store())

    async def run(self, fn: Callable[[Any], R]) -> R:
        """``fn(store)``, on the store's thread; the loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool(), self._call, fn)

    async def record(self, event: TaskEvent) -> None:
        """Apply ``event`` with the others waiting (one ``store.apply`` a batch)."""
        await self._group.submit(event)

    async def _apply(self, events: list[TaskEvent]) -> None:
        await self.run(partial(_apply, events))

    def close(self) -> None:
        """No more calls (a call under way finishes); the next :meth:`run`
        starts a thread again (an application served again)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _apply(events: list[TaskEvent], store: Any) -> None:
    store.apply(events)
