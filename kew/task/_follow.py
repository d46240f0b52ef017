"""Following a task from asyncio code: its output as it is recorded, until
it ends (``App.follow``), for a web route that streams it.

The task store is a sync API (SQLite, PostgreSQL): each read runs in a
worker thread (``asyncio.to_thread``), one at a time per app (a store need
not be thread-safe), so the event loop never waits on the store.  The
output is read every ``interval`` seconds while the task runs; once its
status is final, what was recorded with or after the final event is read
once more, and the stream ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TypeVar

from kew.task.model import TaskRecord

__all__ = ["follow_output"]

R = TypeVar("R")


async def follow_output(
    status: Callable[[str], TaskRecord | None],
    output: Callable[[str, int], tuple[str, int]],
    lock: threading.Lock,
    task_id: str,
    *,
    interval: float = 0.25,
    timeout: float | None = None,
) -> AsyncIterator[str]:
    """Yield the output of ``task_id`` as it is recorded, until the task is
    final (or ``timeout`` seconds passed).  Raises KeyError for a task the
    store has never heard of (checked before the first chunk)."""

    def locked(fn: Callable[[], R]) -> R:
        with lock:
            return fn()

    async def read(fn: Callable[[], R]) -> R:
        return await asyncio.to_thread(locked, fn)

    if await read(lambda: status(task_id)) is None:
        raise KeyError(task_id)
    offset = 0
    ends = None if timeout is None else time.monotonic() + timeout
    while True:
        record = await read(lambda: status(task_id))
        text, offset = await read(partial(output, task_id, offset))
        if text:
            yield text
        if record is not None and record.final:
            # what was recorded with (or just after) the final event
            text, offset = await read(partial(output, task_id, offset))
            if text:
                yield text
            return
        if ends is not None and time.monotonic() >= ends:
            return
        await asyncio.sleep(interval)
