"""No hoarding: a worker with the default (adaptive) window holds no more
long tasks than it runs, so a worker started a moment later gets its share
at once.  Two workers of concurrency 2, eight 1-second tasks, the second
worker 0.2 s after the first: each runs four, and all are done in about
2 s, not 4.  On SQLite, Redis and RabbitMQ (the scene: tests/hoarding_kit.py)."""

from __future__ import annotations

import time

from kew.task import App
from tests.hoarding_kit import KINDS, LEASE, Runs, check_a_later_worker_gets_its_share
from tests.task_apps import app_fixture, suffix

app = app_fixture(KINDS, lease=LEASE, events="h.events", name="hoard")


def test_a_later_worker_gets_its_share_of_long_tasks(app: App) -> None:
    runs = Runs()

    def work(n: int) -> None:
        start = time.monotonic()
        time.sleep(1.0)  # the task's work
        runs.note(n, start)

    tq = app.task_queue(f"h.tasks-{suffix()}", int, work)
    check_a_later_worker_gets_its_share(app, tq, runs, "handlers")
