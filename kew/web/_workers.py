"""Workers: ``GET /workers``, from their heartbeats (``store.workers()``)
and the tasks the store shows running on each."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler

from kew.task.model import TaskRecord, WorkerRecord
from kew.web._errors import AUTH_ERRORS
from kew.web._state import WebState, web_state
from kew.web.search import TaskQuery, search_tasks

#: At most this many running tasks are listed (over all workers).
MAX_RUNNING = 2000


class WorkerOut(msgspec.Struct, frozen=True):
    """A worker: ``alive`` when its last heartbeat is within ``worker_window``
    (else stale: stopped, killed or cut off), the queues it consumes,
    ``concurrency`` (its threads) when known - for a worker running in this
    server -, and the tasks the store shows running on it.  A worker with
    running tasks but no heartbeat on record has ``last_seen`` 0."""

    id: str
    alive: bool
    last_seen: int
    queues: list[str]
    concurrency: int | None
    running: list[TaskRecord]


def _read(store: Any) -> tuple[list[WorkerRecord], list[TaskRecord]]:
    running = TaskQuery(statuses=("running",), limit=MAX_RUNNING)
    return list(store.workers()), search_tasks(store, running)


async def workers_view(web: WebState) -> list[WorkerOut]:
    """Every worker heard of, alive ones first, with its running tasks."""
    beats, running = await web.backend.on_store(_read)
    by_worker: dict[str, list[TaskRecord]] = {}
    for r in running:
        by_worker.setdefault(r.worker, []).append(r)
    horizon = int((time.time() - web.config.worker_window) * 1000)
    out = [
        WorkerOut(
            w.id,
            w.last_seen >= horizon,
            w.last_seen,
            [q for q in w.queues.split(",") if q],
            web.local_workers.get(w.id),
            by_worker.pop(w.id, []),
        )
        for w in beats
    ]
    out += [
        WorkerOut(wid, False, 0, sorted({r.queue for r in tasks}), None, tasks)
        for wid, tasks in sorted(by_worker.items())
    ]
    out.sort(key=lambda w: (not w.alive, w.id))
    return out


@get(
    "/workers",
    summary="Workers: alive or stale, their queues and running tasks",
    raises=AUTH_ERRORS,
    tags=["monitoring"],
)
async def workers(state: State) -> list[WorkerOut]:
    """Every worker heard of through heartbeats (alive first), and the tasks
    running on each."""
    return await workers_view(web_state(state))


#: The worker routes.
WORKER_ROUTES: list[HTTPRouteHandler] = [workers]
