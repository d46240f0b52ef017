"""What the charts draw: tasks started/succeeded/failed per time bucket,
counted from the task store's records, and every queue's depth, sampled
while the server runs and kept in its memory.

* Task counts come from the records' ``started_at`` (the start of the
  task's latest run) and ``finished_at`` (with the final status): a task
  that ran three attempts counts once, when its last attempt started, and
  ``failed`` counts tasks that failed for good, not failed attempts.
* Depths are sampled every ``sample_seconds`` by a task on the server's
  event loop (:class:`Sampler`) for ``history_hours``; a restart starts the history
  afresh, and several servers each keep their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from kew.task.model import TaskRecord
from kew.web.backend import QueueInfo

log = logging.getLogger("kew.web")


class DepthPoint(msgspec.Struct, frozen=True):
    """A queue's depths at ``at`` (epoch ms); -1: the provider cannot count it."""

    at: int
    ready: int
    in_flight: int
    delayed: int
    dead: int


class TaskPoint(msgspec.Struct, frozen=True):
    """Tasks of a time bucket starting at ``at`` (epoch ms)."""

    at: int
    started: int
    succeeded: int
    failed: int


class DepthHistory:
    """Depth samples of every queue over the last ``keep_seconds``, in memory."""

    def __init__(self, keep_seconds: float) -> None:
        self.keep_ms = int(keep_seconds * 1000)
        self._lock = threading.Lock()
        self._points: dict[str, deque[DepthPoint]] = {}

    def add(self, infos: Iterable[QueueInfo], at: int) -> None:
        horizon = at - self.keep_ms
        with self._lock:
            for q in infos:
                points = self._points.setdefault(q.name, deque())
                points.append(DepthPoint(at, q.ready, q.in_flight, q.delayed, q.dead))
                while points and points[0].at < horizon:
                    points.popleft()

    def series(self, queue: str, since: int) -> list[DepthPoint]:
        with self._lock:
            return [p for p in self._points.get(queue, ()) if p.at >= since]

    def queues(self) -> list[str]:
        with self._lock:
            return sorted(self._points)


class Sampler:
    """A task of the event loop that awaits ``sample()`` every ``every``
    seconds (first at once; the next ``every`` seconds after one ends) until
    :meth:`stop`; a failing sample (broker down) is skipped."""

    def __init__(self, sample: Callable[[], Awaitable[None]], every: float) -> None:
        self._sample = sample
        self.every = every
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def start(self) -> Sampler:
        """Start on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kew-web-sampler")
        return self

    async def _run(self) -> None:
        while True:
            try:
                await self._sample()
            except Exception as e:
                self.failures += 1
                log.debug("kew.web: queue depth sample failed: %s", type(e).__name__)
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def bucket_ms(window_ms: int, most: int = 240) -> int:
    """A bucket width for a window: one minute, or whole minutes so that
    there are at most ``most`` buckets."""
    minutes = max(1, -(-window_ms // (60_000 * most)))
    return minutes * 60_000


def task_counts(
    records: Iterable[TaskRecord], since: int, until: int, width: int, queues: Sequence[str]
) -> dict[str, list[TaskPoint]]:
    """Per queue of ``queues`` (and ``"*"``: all of them), the tasks started,
    succeeded and failed in each bucket of ``width`` ms from ``since``."""
    n = max(1, -(-(until - since) // width))
    counts = {q: [[0, 0, 0] for _ in range(n)] for q in (*queues, "*")}

    def add(queue: str, at: int | None, column: int) -> None:
        if at is None or not since <= at < since + n * width:
            return
        i = (at - since) // width
        for key in (queue, "*"):
            row = counts.get(key)
            if row is not None:
                row[i][column] += 1

    for r in records:
        add(r.queue, r.started_at, 0)
        if r.status == "succeeded":
            add(r.queue, r.finished_at, 1)
        elif r.status == "failed":
            add(r.queue, r.finished_at, 2)
    return {
        q: [TaskPoint(since + i * width, *c) for i, c in enumerate(rows)]
        for q, rows in counts.items()
    }


def now_ms() -> int:
    return int(time.time() * 1000)
