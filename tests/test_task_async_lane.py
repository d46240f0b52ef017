"""The async route (kew.task._async_run.Lane): a handler thread hands an
async attempt to the app's event loop and goes on at once, so what bounds
the coroutines running is the lane, per queue: never more than the queue's
concurrency at once, however many deliveries the window holds.  Attempts
waiting their turn on the loop are handed back on a graceful stop (with the
running ones, cancelled once the grace ran out) and run by the next worker;
one cancelled while it waits never starts; an async exceeded handler runs
after the last attempt.  On memory, SQLite, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kew.task import App, SqliteTaskStore
from kew.testing.util import wait_for
from tests.task_apps import app_fixture, final, suffix

app = app_fixture(events="lane.events")
app3 = app_fixture(("memory", "redis", "rabbitmq"), events="lane.events")


def test_never_more_coroutines_at_once_than_the_concurrency(app: App) -> None:
    """200 tasks on a queue of concurrency 8 and 30 on one of concurrency 2,
    one worker, both on the app's loop: counted inside the handlers."""
    now = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}
    done: dict[str, list[int]] = {"a": [], "b": []}

    def counted(lane: str) -> Callable[[int], Awaitable[None]]:
        async def work(n: int) -> None:
            now[lane] += 1  # (every coroutine runs on the loop's one thread)
            peak[lane] = max(peak[lane], now[lane])
            try:
                await asyncio.sleep(0.02)
            finally:
                now[lane] -= 1
            done[lane].append(n)

        return work

    a = app.task_queue(f"lane.a-{suffix()}", int, counted("a"), concurrency=8)
    b = app.task_queue(f"lane.b-{suffix()}", int, counted("b"), concurrency=2)
    a.submit_many(range(200))
    b.submit_many(range(30))
    w = app.worker().start()
    try:
        wait_for(lambda: len(done["a"]) == 200 and len(done["b"]) == 30, 60, what="every task run")
        # every delivery settled (acked) once its attempt ended
        wait_for(lambda: all(s.in_flight == 0 for s in w.subscriptions), 30, what="all settled")
    finally:
        w.stop(5)
    assert sorted(done["a"]) == list(range(200)) and sorted(done["b"]) == list(range(30))
    assert peak == {"a": 8, "b": 2}, peak
    for q in (a, b):
        stats = q.queue.browser().stats()
        assert (stats.ready, stats.dead) == (0, 0), stats


def test_a_graceful_stop_hands_back_running_and_waiting_attempts(app3: App, tmp_path: Path) -> None:
    """Concurrency 2, a window of 6 pinned: two coroutines run, four wait
    their turn on the loop.  The stop's grace runs out: the two are
    cancelled, the four never start, all six are handed back and run by
    the next worker (attempt 1 still)."""
    app = app3
    gate = threading.Event()
    started: list[tuple[str, int]] = []
    cancelled: list[int] = []
    finished: list[tuple[str, int]] = []

    async def work(n: int) -> None:
        from kew.task import current

        started.append((current().worker, n))
        try:
            while not gate.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        finished.append((current().worker, n))

    tq = app.task_queue(f"lane.stop-{suffix()}", int, work)
    ids = tq.submit_many(range(6))
    first = app.worker(concurrency=2, prefetch=6).start()
    try:
        wait_for(lambda: len(started) == 2, 30, what="two attempts running")
        sub = first.subscriptions[0]
        wait_for(lambda: sub.in_flight == 6, 30, what="six held")
        time.sleep(0.1)  # (were a third to start, it would have by now)
    finally:
        assert first.stop(0.3) is False  # two still running after the grace
    assert len(started) == 2 and sorted(cancelled) == sorted(n for _, n in started)
    gate.set()
    second = app.worker(concurrency=2, record=True).start()
    try:
        records = [final(app, t) for t in ids]
    finally:
        second.stop(5)
    assert {(r.status, r.attempt) for r in records} == {("succeeded", 1)}
    assert sorted(n for w, n in finished if w == second.id) == list(range(6))
    for t in ids:
        out = app.output(t)[0]
        assert f"worker {first.id} stopped: attempt 1 handed back" in out, out


def test_an_attempt_cancelled_while_it_waits_its_turn_never_starts(tmp_path: Path) -> None:
    app = App("memory://", store=SqliteTaskStore(tmp_path / "tasks.sqlite3"))
    gate = threading.Event()
    started: list[int] = []

    async def work(n: int) -> None:
        started.append(n)
        while n == 0 and not gate.is_set():
            await asyncio.sleep(0.01)

    tq = app.task_queue(f"lane.wait-{suffix()}", int, work)
    ids = tq.submit_many(range(3))
    w = app.worker(concurrency=1, prefetch=3, record=True).start()
    try:
        wait_for(lambda: started == [0], 20, what="the first attempt running")
        wait_for(lambda: len(app.active()) == 3, 20, what="the other two waiting their turn")
        wait_for(lambda: app.status(ids[1]) is not None, 20, what="the task recorded")
        app.cancel(ids[1])
        cancelled = final(app, ids[1])
        gate.set()
        others = [final(app, ids[0]), final(app, ids[2])]
    finally:
        w.stop(5)
        app.close()
    assert cancelled.status == "cancelled"
    assert [r.status for r in others] == ["succeeded", "succeeded"]
    assert started == [0, 2]


def test_an_async_exceeded_handler_runs_after_the_last_attempt(tmp_path: Path) -> None:
    """The finisher runs the rest of a failed attempt; an async exceeded
    handler runs on the loop meanwhile (the finisher waits, the loop does
    not), with the task's context."""
    from kew.task import NoRetry, current

    app = App("memory://", store=SqliteTaskStore(tmp_path / "tasks.sqlite3"))
    seen: list[tuple[int, str]] = []

    async def fail(n: int) -> None:
        raise ValueError(f"task {n} cannot be done")

    async def exceeded(n: int) -> None:
        await asyncio.sleep(0.01)
        ctx = current()
        ctx.log(f"exceeded {n}")
        seen.append((n, ctx.id))

    tq = app.task_queue(f"lane.exc-{suffix()}", int, fail, retry=NoRetry(), on_exceeded=exceeded)
    w = app.worker(concurrency=2, record=True).start()
    try:
        ids = tq.submit_many([1, 2])
        records = [final(app, t) for t in ids]
    finally:
        w.stop(5)
    try:
        assert [r.status for r in records] == ["failed", "failed"]
        assert sorted(seen) == sorted(zip([1, 2], ids, strict=True))
        out = app.output(ids[0])[0]
        assert "exceeded 1\n" in out and "ValueError: task 1 cannot be done" in out, out
        assert tq.queue.browser().stats().dead == 2
    finally:
        app.close()
