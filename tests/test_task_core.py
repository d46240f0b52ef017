"""kew.task in one process: retries, permanent errors, exceeded handler,
outcomes, status and output through the recorder, on memory://, SQLite and
the machine's Redis (skipped if unreachable, required under CI=true)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

import kew
from kew.qchan.spi import now_ms
from kew.task import (
    App,
    Exponential,
    Intervals,
    MemoryTaskStore,
    NoRetry,
    Permanent,
    Retry,
    SqliteTaskStore,
    TaskEvent,
    current,
)
from kew.testing.util import wait_for
from tests.task_apps import app_fixture, final, suffix


class Job(msgspec.Struct, frozen=True):
    n: int
    fail: int = 0  # attempts that fail before one succeeds
    mode: str = "error"  # error | permanent | retry-after


app = app_fixture()


class Recorder:
    """What a handler saw: attempt numbers and their times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[int, list[tuple[int, float]]] = {}
        self.exceeded: list[int] = []

    def handler(self, job: Job) -> None:
        ctx = current()
        with self.lock:
            self.attempts.setdefault(job.n, []).append((ctx.attempt, time.monotonic()))
        ctx.log(f"job {job.n} attempt {ctx.attempt}")
        if ctx.attempt <= job.fail:
            if job.mode == "permanent":
                raise Permanent(f"job {job.n} cannot be done")
            if job.mode == "retry-after":
                raise Retry("not yet", after=0.05)
            raise ValueError(f"job {job.n} failed in attempt {ctx.attempt}")

    def on_exceeded(self, job: Job) -> None:
        with self.lock:
            self.exceeded.append(job.n)


def test_retry_intervals_honoured_then_exceeded_once(app: App) -> None:
    rec = Recorder()
    tq = app.task_queue(
        f"t.intervals-{suffix()}",
        Job,
        rec.handler,
        retry=Intervals([0.3, 0.6]),
        on_exceeded=rec.on_exceeded,
        notify=True,
    )
    w = app.worker(concurrency=2, record=True).start()
    try:
        ok = tq.submit(Job(1, fail=2))  # succeeds in attempt 3
        bad = tq.submit(Job(2, fail=9))  # never succeeds: 3 attempts, then exceeded
        r_ok, r_bad = final(app, ok), final(app, bad)
        assert (r_ok.status, r_ok.attempt) == ("succeeded", 3)
        assert (r_bad.status, r_bad.attempt) == ("failed", 3)
        assert "failed after 3 attempts" in r_bad.last_error
        assert "job 2 failed in attempt 3" in r_bad.last_error
        for n in (1, 2):
            times = rec.attempts[n]
            assert [a for a, _ in times] == [1, 2, 3]
            # never earlier than the interval (a lower bound only: no timing upper bounds)
            assert times[1][1] - times[0][1] >= 0.3 - 0.02
            assert times[2][1] - times[1][1] >= 0.6 - 0.02
        wait_for(lambda: rec.exceeded == [2], 5, what="the exceeded handler")
        text, _ = app.output(bad)
        assert text.index("job 2 attempt 1") < text.index("--- attempt 2 ---")
        assert text.index("--- attempt 2 ---") < text.index("job 2 attempt 2")
        assert text.index("--- attempt 3 ---") < text.index("job 2 attempt 3")
        assert "ValueError: job 2 failed in attempt 3" in text
        # the failed task stays in the dead letters, with the reason
        dead = wait_for(lambda: tq.queue.dead.list(), 10, what="the dead letter")
        assert [d.id for d in dead] == [bad]
        assert "failed after 3 attempts" in dead[0].reason
        assert tq.outcomes is not None
        outcomes = tq.outcomes
        wait_for(lambda: len(outcomes.browser().peek()) == 6, 10, what="3 outcomes each")
        kinds = [(o.task_id, o.kind, o.attempt) for o in outcomes.browser().peek()]
        assert sorted(k for k in kinds if k[0] == bad) == sorted(
            [(bad, "attempt-failed", 1), (bad, "attempt-failed", 2), (bad, "failed", 3)]
        )
        assert (ok, "succeeded", 3) in kinds
    finally:
        w.stop(5)
    assert rec.exceeded == [2]  # once


def test_concurrent_mixed_outcomes_each_task_runs_once(app: App) -> None:
    """Eight handlers settling at once, some tasks dead-lettered (permanent
    failure) while others' settles are under way: every task runs exactly
    once, nothing is redelivered.  (RabbitMQ once dropped its channel here:
    a dead letter's frames written during another settle's tx.commit.)"""
    rec = Recorder()
    tq = app.task_queue(f"t.mixed-{suffix()}", Job, rec.handler, retry=Intervals([30]))
    n = 240
    ids = [tq.submit(Job(i, fail=1 if i % 4 == 0 else 0, mode="permanent")) for i in range(n)]
    w = app.worker(concurrency=8, record=True).start()
    try:
        records = [final(app, tid, timeout=60) for tid in ids]
    finally:
        w.stop(5)
    assert [r.status for r in records] == [
        "failed" if i % 4 == 0 else "succeeded" for i in range(n)
    ]
    runs = {job: [a for a, _ in attempts] for job, attempts in rec.attempts.items()}
    assert runs == {i: [1] for i in range(n)}, "a task ran twice: its delivery came again"
    dead = wait_for(lambda: len(tq.queue.dead.list()) == n // 4, 10, what="the dead letters")
    assert dead


def test_exponential_backoff_honoured(app: App) -> None:
    rec = Recorder()
    tq = app.task_queue(
        f"t.exp-{suffix()}",
        Job,
        rec.handler,
        retry=Exponential(base=0.2, cap=0.3, max_attempts=4, jitter="none"),
        on_exceeded=rec.on_exceeded,
    )
    with_worker = app.worker(concurrency=1, record=True).start()
    try:
        tid = tq.submit(Job(7, fail=10))
        r = final(app, tid)
        assert (r.status, r.attempt) == ("failed", 4)
        times = [t for _, t in rec.attempts[7]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, least in zip(gaps, [0.2, 0.3, 0.3], strict=True):  # 0.2, 0.4 capped at 0.3
            assert gap >= least - 0.02
        wait_for(lambda: rec.exceeded == [7], 5)
    finally:
        with_worker.stop(5)


def test_permanent_skips_retries_and_retry_after_overrides(app: App) -> None:
    rec = Recorder()
    tq = app.task_queue(
        f"t.perm-{suffix()}",
        Job,
        rec.handler,
        retry=Intervals([30, 30]),  # a retry would not come within the test
        on_exceeded=rec.on_exceeded,
    )
    w = app.worker(concurrency=2, record=True).start()
    try:
        perm = tq.submit(Job(3, fail=5, mode="permanent"))
        again = tq.submit(Job(4, fail=1, mode="retry-after"))  # after=0.05 beats the 30 s
        r = final(app, perm)
        assert (r.status, r.attempt) == ("failed", 1)
        assert r.last_error == "permanent failure in attempt 1: job 3 cannot be done"
        r2 = final(app, again)
        assert (r2.status, r2.attempt) == ("succeeded", 2)
        assert [a for a, _ in rec.attempts[3]] == [1]
        wait_for(lambda: rec.exceeded == [3], 5)
        assert "[kew] attempt 1 failed: not yet" in app.output(again)[0]
    finally:
        w.stop(5)


def test_decorator_status_output_and_events(app: App) -> None:
    seen: list[TaskEvent] = []
    app.on_event(seen.append)
    started = threading.Event()
    go_on = threading.Event()

    @app.task(f"t.deco-{suffix()}", retry=NoRetry())
    def slow(job: Job) -> str:
        ctx = current()
        ctx.log(f"first line of {ctx.id}")
        started.set()
        go_on.wait(10)
        ctx.write("no newline")
        return "done"

    assert slow.type is Job
    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = slow.submit(Job(5))
        assert started.wait(10)
        # while it runs: "running" and the first line reach the store (flushed at ~0.2 s)
        wait_for(lambda: (r := app.status(tid)) is not None and r.status == "running", 10)
        wait_for(lambda: app.output(tid)[0] == f"first line of {tid}\n", 10)
        assert app.status(tid).worker == w.id  # type: ignore[union-attr]
        go_on.set()
        r = final(app, tid)
        assert r.status == "succeeded" and r.started_at and r.finished_at
        text, offset = app.output(tid)
        assert text == f"first line of {tid}\nno newline"
        assert app.output(tid, 6) == (text[6:], len(text))
        assert app.output(tid, offset) == ("", offset)
        kinds = [e.kind for e in seen if e.task_id == tid]
        assert kinds.count("queued") == 1  # (the worker may take the task before submit returns)
        kinds.remove("queued")
        assert kinds[0] == "running" and kinds[-1] == "succeeded"
        assert "output" in kinds
        recent = app.store.recent(10, queue=slow.name)
        assert [x.id for x in recent] == [tid]
        assert any(wr.id == w.id for wr in app.store.workers())
    finally:
        go_on.set()
        w.stop(5)


def test_poison_body_dead_lettered_and_recorded_failed(app: App) -> None:
    rec = Recorder()
    tq = app.task_queue(f"t.poison-{suffix()}", Job, rec.handler)
    # someone sends a body that is not a Job, with their own id
    from kew.qchan.spi import Message

    tq.queue.declare()  # a queue is declared on first use, not when it is made
    app.connector.producer(tq.name).send(Message("bad-" + suffix(), b'{"n": "x"}', {}))
    good = tq.submit(Job(6))
    w = app.worker(concurrency=1, record=True).start()
    try:
        final(app, good)
        dead = wait_for(lambda: tq.queue.dead.list(), 10)
        assert "Expected `int`, got `str`" in dead[0].reason
        r = final(app, dead[0].id)
        assert r.status == "failed" and "cannot decode as Job" in r.last_error
    finally:
        w.stop(5)


def test_submit_json_validates_and_names_the_problem(app: App) -> None:
    tq = app.task_queue(f"t.json-{suffix()}", Job, Recorder().handler)
    with pytest.raises(
        kew.DecodeError, match=r"not a valid Job: Expected `int`, got `str` - at `\$.n`"
    ):
        tq.submit_json(b'{"n": "seven"}')
    with pytest.raises(kew.DecodeError, match="not a valid Job"):
        tq.submit_json(b"{not json")
    assert tq.queue.browser().stats().ready == 0  # nothing sent
    with pytest.raises(
        kew.DecodeError, match=r"not a valid Job: Expected `int`, got `str` - at `\$.n`"
    ):
        tq.submit(Job("eight"))  # type: ignore[arg-type]
    with pytest.raises(kew.DecodeError, match=r"not a valid Job: Expected `object`, got `str`"):
        tq.submit("eight")  # type: ignore[arg-type]
    assert tq.queue.browser().stats().ready == 0
    tid = tq.submit_json(b'{"n": 8}')
    assert tq.queue.browser().peek() == [Job(8)]
    assert len(tid) == 32


def test_delayed_submit_is_not_run_early(app: App) -> None:
    rec = Recorder()
    tq = app.task_queue(f"t.delay-{suffix()}", Job, rec.handler)
    w = app.worker(concurrency=1, record=True).start()
    try:
        t0 = time.monotonic()
        tid = tq.submit(Job(9), delay=0.5)
        final(app, tid)
        assert rec.attempts[9][0][1] - t0 >= 0.5 - 0.02
    finally:
        w.stop(5)


# -- without a broker: declarations, errors, direct calls ---------------------------


def test_declaration_errors_are_clear() -> None:
    app = App("memory://", store="memory://")

    def untyped(job):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(TypeError, match="annotate its first parameter"):
        app.task()(untyped)

    def nothing() -> None:
        pass

    with pytest.raises(TypeError, match="takes no parameter"):
        app.task()(nothing)  # type: ignore[arg-type]
    app.task_queue("dup", int, print)
    with pytest.raises(ValueError, match="declared twice"):
        app.task_queue("dup", int, print)
    with pytest.raises(ValueError, match="invalid queue name"):
        app.task_queue("bad name", int, print)
    with pytest.raises(TypeError, match="RetryPolicy"):
        app.task_queue("r", int, print, retry=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exit code 3 maps to 'maybe'"):
        app.command_task("c", int, lambda n: ["true"], exit_codes={3: "maybe"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="no queue 'nope'"):
        app.worker(queues=["nope"])
    with pytest.raises(ValueError, match="delay must be"):
        app.queues["dup"].submit(1, delay=-1)
    app.close()


def test_direct_call_has_a_context_and_current_outside_raises() -> None:
    app = App("memory://", store="memory://")

    @app.task()
    def double(n: int) -> int:
        current().log("doubling")
        return n * 2

    assert double(21) == 42
    with pytest.raises(RuntimeError, match="outside a task"):
        current()
    assert app.queue_names() == ["double", "kew.task-events"]
    app.close()


def test_retry_policies() -> None:
    iv = Intervals.minutes(10, 10, 120)
    assert [iv.delay(a) for a in (1, 2, 3, 4)] == [600, 600, 7200, None]
    assert Intervals([]).delay(1) is None
    with pytest.raises(ValueError, match="retry interval 2"):
        Intervals([1, -1])
    with pytest.raises(TypeError):
        Intervals("10")  # type: ignore[arg-type]
    ex = Exponential(base=1, cap=5, max_attempts=6)
    for attempt in range(1, 6):
        bound = min(5, 2 ** (attempt - 1))
        draws = [ex.delay(attempt) for _ in range(200)]
        assert all(d is not None and 0 <= d <= bound for d in draws)
        assert max(d for d in draws if d is not None) > bound / 2  # full jitter spreads
    assert ex.delay(6) is None
    assert Exponential(1, 5, 6, jitter="none").delay(3) == 4
    assert NoRetry().delay(1) is None
    with pytest.raises(ValueError, match="max_attempts"):
        Exponential(max_attempts=0)
    with pytest.raises(ValueError, match="after"):
        Retry("x", after=-1)


# -- the store (the stores themselves, on every kind: tests/test_task_store.py) -------


STORE_READER = r"""
import sys
from kew.task import open_store
s = open_store(sys.argv[1])
r = s.get(sys.argv[2])
print(r.status, r.attempt)
print(s.output(sys.argv[2])[0], end="")
"""


def test_status_and_output_readable_from_another_process(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/shared-tasks.sqlite3"
    app = App(f"sqlite:///{tmp_path}/q.sqlite3?lease=2", store=store_url)

    @app.task(retry=Intervals([0.05]))
    def flaky(n: int) -> None:
        ctx = current()
        ctx.log(f"n={n} attempt={ctx.attempt}")
        if ctx.attempt == 1:
            raise Retry("once more")

    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = flaky.submit(3)
        final(app, tid)
    finally:
        w.stop(5)
    out = subprocess.run(
        [sys.executable, "-c", STORE_READER, store_url, tid],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.splitlines() == [
        "succeeded 2",
        "n=3 attempt=1",
        "[kew] attempt 1 failed: once more",
        "--- attempt 2 ---",
        "n=3 attempt=2",
    ]
    app.close()


def test_open_store_urls(tmp_path: Path) -> None:
    from kew.task import open_store

    assert isinstance(open_store("memory://"), MemoryTaskStore)
    s = open_store(f"sqlite:///{tmp_path}/x.sqlite3")
    assert isinstance(s, SqliteTaskStore) and s.path == tmp_path / "x.sqlite3"
    with pytest.raises(ValueError, match="unknown task store URL"):
        open_store("mysql://x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/dir/x.sqlite3")
    assert now_ms() > 0


def test_worker_prefetch_heartbeat_health_and_untracked(tmp_path: Path) -> None:
    app = App("memory://", store=MemoryTaskStore())
    ran: list[int] = []
    fast = app.task_queue("fast", int, ran.append, track=False)
    app.task_queue("own", int, print, concurrency=3)
    got: list[str] = []
    extra: kew.Queue[str] = kew.Queue(app.connector, "extra", str)
    app.consumer(extra, got.append)
    health = tmp_path / "healthy"
    w = app.worker(concurrency=2, record=True)
    assert not w.healthy()  # not started
    w.heartbeat = 0.1
    w.health_file = health
    w.start()
    try:
        assert {s.name: s.prefetch for s in w.subscriptions} == {"fast": 2, "own": 3, "extra": 1}
        assert w.healthy()
        wait_for(health.exists, 5, what="the health file")
        seen = wait_for(lambda: [x for x in app.store.workers() if x.id == w.id], 5)
        assert seen[0].queues == "fast,own,extra"
        first = seen[0].last_seen
        wait_for(lambda: app.store.workers()[0].last_seen > first, 5, what="a later heartbeat")
        tid = fast.submit(1)
        extra.send("hello")
        wait_for(lambda: ran == [1] and got == ["hello"], 5)
        assert app.status(tid) is None  # untracked: no events at all
    finally:
        assert w.stop(5)
    assert not w.healthy() and not health.exists()
    app.close()


def test_recorder_drops_tasks_past_retention(tmp_path: Path) -> None:
    app = App("memory://", store=SqliteTaskStore(tmp_path / "t.sqlite3"), retention_days=1 / 86400)
    app.prune_interval = 0.1
    tq = app.task_queue("short-lived", int, lambda n: current().log(f"n={n}"))
    w = app.worker(concurrency=1, record=True)
    w.heartbeat = 0.1  # heartbeats keep the recorder applying batches
    w.start()
    try:
        tid = tq.submit(1)
        done = final(app, tid)
        assert app.output(tid)[0] == "n=1\n"
        # a second later (the retention), the recorder has dropped it with its output
        wait_for(lambda: app.status(tid) is None, 10, what="the task pruned")
        assert now_ms() - (done.finished_at or 0) >= 1000
        assert app.output(tid) == ("", 0)
    finally:
        w.stop(5)
    app.close()
