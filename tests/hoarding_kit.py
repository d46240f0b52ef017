"""The no-hoarding scene of tests/test_task_hoarding.py (sync tasks) and
tests/test_task_async_hoarding.py (async ones): two workers of concurrency
2, eight tasks of 1 s, the second worker 0.2 s after the first; each must
run four, all within about 2 s (not 4), each window at the concurrency."""

from __future__ import annotations

import threading
import time

from kew.task import App, TaskQueue, current
from kew.testing.util import wait_for

#: The brokers the scene runs on, and their lease (longer than a task).
KINDS = ("sqlite", "redis", "rabbitmq")
LEASE = 5


class Runs:
    """What each task saw, noted by its handler (from any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: dict[int, tuple[str, float, float]] = {}  # task -> (worker, start, end)

    def note(self, n: int, start: float) -> None:
        """Task ``n``, started at ``start`` (monotonic), ends now."""
        with self.lock:
            self.ran[n] = (current().worker, start, time.monotonic())


def check_a_later_worker_gets_its_share(app: App, tq: TaskQueue[int], runs: Runs, of: str) -> None:
    """Submit 8 tasks to ``tq`` (its handler 1 s of work noted in ``runs``),
    start the two workers and check the scene; ``of``: what runs the tasks
    (for the message)."""
    ran = runs.ran
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
    assert makespan < 3.0, f"8 tasks of 1 s on 2 x 2 {of} took {makespan:.1f} s: {by_worker}"
    assert windows == [2, 2]  # long tasks: the window is the concurrency
