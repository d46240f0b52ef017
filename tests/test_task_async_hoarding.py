"""No hoarding of long async tasks: an ``async def`` attempt runs on the
app's event loop after its handler thread handed it over, and the adaptive
window still sees how long it runs, so it stays the concurrency and a
worker started a moment later gets its share.  Two workers of concurrency
2, eight async tasks of 1 s (``asyncio.sleep``), the second worker 0.2 s
after the first: each runs four, and all are done in about 2 s, not 4.  On
SQLite, Redis and RabbitMQ (as tests/test_task_hoarding.py for sync
tasks; the scene: tests/hoarding_kit.py)."""

from __future__ import annotations

import asyncio
import time

from kew.task import App
from tests.hoarding_kit import KINDS, LEASE, Runs, check_a_later_worker_gets_its_share
from tests.task_apps import app_fixture, suffix

app = app_fixture(KINDS, lease=LEASE, events="ah.events", name="ahoard")


def test_a_later_worker_gets_its_share_of_long_async_tasks(app: App) -> None:
    runs = Runs()

    async def work(n: int) -> None:
        start = time.monotonic()
        await asyncio.sleep(1.0)  # the task's work
        runs.note(n, start)  # (on the loop's thread)

    tq = app.task_queue(f"ah.tasks-{suffix()}", int, work)
    assert tq.is_async
    check_a_later_worker_gets_its_share(app, tq, runs, "coroutines")
