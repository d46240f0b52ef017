"""No hoarding of long async tasks: an ``async def`` attempt runs on the
app's event loop after its handler thread handed it over, and the adaptive
window still sees how long it runs, so it stays the concurrency and a
worker started a moment later gets its share.  Two workers of concurrency
2, eight async tasks of 1 s (``asyncio.sleep``), the second worker 0.2 s
after the first: each runs four, and all are done in about 2 s, not 4.  On
SQLite, Redis and RabbitMQ (as tests/test_task_hoarding.py for sync
tasks)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kew
from kew.task import App, current
from kew.testing.util import port_open, require, wait_for


@pytest.fixture(params=["sqlite", "redis", "rabbitmq"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/q.sqlite3?lease=5"
    if request.param == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        return "redis://127.0.0.1:6379/0?lease=5"
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def app(url: str, tmp_path: Path) -> Iterator[App]:
    suffix = os.urandom(4).hex()
    a = App(
        url,
        name=f"ahoard-{suffix}",
        store=f"sqlite:///{tmp_path}/tasks.sqlite3",
        events_queue=f"ah.events-{suffix}",
    )
    yield a
    names = a.queue_names()
    a.close()
    c = kew.connect(url)
    try:
        for name in names:
            c.delete(name)
    finally:
        c.close()


def test_a_later_worker_gets_its_share_of_long_async_tasks(app: App) -> None:
    ran: dict[int, tuple[str, float, float]] = {}  # task -> (worker, start, end)

    async def work(n: int) -> None:
        start = time.monotonic()
        await asyncio.sleep(1.0)  # the task's work
        ran[n] = (current().worker, start, time.monotonic())  # (on the loop's thread)

    tq = app.task_queue(f"ah.tasks-{os.urandom(4).hex()}", int, work)
    assert tq.is_async
    tq.submit_many(range(8))
    first = app.worker(concurrency=2)
    second = app.worker(concurrency=2)
    t0 = time.monotonic()
    first.start()
    try:
        time.sleep(0.2)  # the second worker starts a moment later
        second.start()
        try:
            wait_for(lambda: len(ran) == 8, 30, what="8 tasks run")
            makespan = max(end for _, _, end in ran.values()) - t0
            windows = [s.window for w in (first, second) for s in w.subscriptions]
        finally:
            second.stop(5)
    finally:
        first.stop(5)
    by_worker = {
        w.id: sorted(n for n, (who, _, _) in ran.items() if who == w.id) for w in (first, second)
    }
    assert sorted(len(tasks) for tasks in by_worker.values()) == [4, 4], by_worker
    assert makespan < 3.0, f"8 tasks of 1 s on 2 x 2 coroutines took {makespan:.1f} s: {by_worker}"
    assert windows == [2, 2]  # long tasks: the window is the concurrency
