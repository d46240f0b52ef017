"""Trends: ``GET /stats`` (tasks started/succeeded/failed per time bucket,
from the task store, and queue depths sampled in memory; see
:mod:`kew.web.history`), and what the page's charts are drawn from."""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from kew.web._errors import AUTH_ERRORS, NoSuchQueue
from kew.web._state import WebState, web_state
from kew.web.history import DepthPoint, TaskPoint, bucket_ms, now_ms, task_counts
from kew.web.search import TaskQuery, search_tasks

#: At most this many task records are counted for one window (``partial`` beyond).
MAX_CHART_TASKS = 50_000
#: Seconds a computed window is reused (the page refreshes every few seconds).
CACHE_SECONDS = 2.0


class TaskSeries(msgspec.Struct, frozen=True):
    """A queue's task counts per bucket (``queue`` ``*``: every task queue)."""

    queue: str
    points: list[TaskPoint]


class DepthSeries(msgspec.Struct, frozen=True):
    """A queue's depth samples (``queue`` ``*``: the task queues summed)."""

    queue: str
    points: list[DepthPoint]


class Stats(msgspec.Struct, frozen=True):
    """Trends over ``[since, until)`` (epoch ms): task counts per bucket of
    ``bucket_seconds``, and the depth samples taken every ``sample_seconds``
    since the server started (kept ``history_hours``).  ``partial``: more
    tasks than could be counted changed in the window (the oldest are missing)."""

    since: int
    until: int
    bucket_seconds: int
    sample_seconds: float
    history_hours: float
    tasks: list[TaskSeries]
    depth: list[DepthSeries]
    partial: bool = False


async def take_sample(web: WebState) -> None:
    """Sample every queue's depths into the history (the sampler's job)."""
    web.history.add(await web.backend.queue_infos(), now_ms())


def _summed(series: list[list[DepthPoint]]) -> list[DepthPoint]:
    """Depths of several queues added up, sample by sample (same sampler
    tick: same index from the end); counts a provider cannot give add 0."""
    if not series:
        return []
    n = min(len(s) for s in series)
    out = []
    for i in range(n):
        pts = [s[len(s) - n + i] for s in series]
        out.append(
            DepthPoint(
                max(p.at for p in pts),
                sum(max(p.ready, 0) for p in pts),
                sum(max(p.in_flight, 0) for p in pts),
                sum(max(p.delayed, 0) for p in pts),
                sum(max(p.dead, 0) for p in pts),
            )
        )
    return out


_cache_lock = threading.Lock()
_cache: dict[tuple[int, int, str | None], tuple[float, Stats]] = {}


async def compute_stats(web: WebState, minutes: int, queue: str | None = None) -> Stats:
    """The trends of the last ``minutes`` (of one queue if given), reused
    for :data:`CACHE_SECONDS`.  The records are read and counted on the
    store's thread (up to :data:`MAX_CHART_TASKS` of them)."""
    key = (id(web), minutes, queue)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    until = now_ms()
    width = bucket_ms(minutes * 60_000)
    until = -(-until // width) * width  # the current bucket is the last
    since = until - minutes * 60_000
    task_queues = sorted(web.app.queues)
    wanted = [queue] if queue is not None else task_queues
    q = TaskQuery(
        queues=(queue,) if queue is not None else (),
        updated_since=since,
        limit=MAX_CHART_TASKS,
    )
    counted = [w for w in wanted if w in task_queues]

    def count(store: Any) -> tuple[dict[str, list[TaskPoint]], int]:
        records = search_tasks(store, q)
        return task_counts(records, since, until, width, counted), len(records)

    counts, n_records = await web.backend.on_store(count)
    if queue is None:
        tasks = [TaskSeries("*", counts.pop("*"))]
        tasks += [TaskSeries(name, pts) for name, pts in counts.items()]
    else:
        tasks = [TaskSeries(queue, counts[queue])] if queue in counts else []
    names = [queue] if queue is not None else web.app.queue_names()
    depth = [DepthSeries(name, web.history.series(name, since)) for name in names]
    if queue is None:
        summed = _summed([d.points for d in depth if d.queue in task_queues])
        depth.insert(0, DepthSeries("*", summed))
    stats = Stats(
        since,
        until,
        width // 1000,
        web.config.sample_seconds,
        web.config.history_hours,
        tasks,
        depth,
        partial=n_records >= MAX_CHART_TASKS,
    )
    with _cache_lock:
        for k in [k for k, (t, _) in _cache.items() if time.monotonic() - t > CACHE_SECONDS]:
            del _cache[k]
        _cache[key] = (time.monotonic(), stats)
    return stats


@get(
    "/stats",
    summary="Trends: tasks per time bucket and queue depth samples",
    description="Task counts come from the task store (a task counts when its latest run "
    "started and when it finished for good); depths are sampled by this server every "
    "`sample_seconds` and kept in its memory for `history_hours`.",
    raises=[NoSuchQueue, *AUTH_ERRORS],
    tags=["monitoring"],
)
async def stats(
    state: State,
    minutes: Annotated[
        int, Parameter(ge=5, le=1440, description="the window: the last N minutes")
    ] = 60,
    queue: Annotated[str | None, Parameter(max_length=200, description="only this queue")] = None,
) -> Stats:
    """Tasks started/succeeded/failed per bucket (``*``: all task queues)
    and the depth samples of every queue (``*``: the task queues summed)."""
    web = web_state(state)
    if queue is not None and not web.backend.known(queue):
        raise NoSuchQueue(detail=f"no queue named {queue!r}")
    return await compute_stats(web, minutes, queue)


#: The trend routes.
STATS_ROUTES: list[HTTPRouteHandler] = [stats]
