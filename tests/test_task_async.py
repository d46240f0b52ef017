"""``@app.task`` on an ``async def``: the coroutine runs on the app's event
loop with ``current()`` working inside it; retries, permanent failure,
output and status as for a sync handler; ``time_limit`` cancels it (and a
handler that swallows the cancel is given up on); cancel on request
cancels it; sync and async queues side by side in one worker.  Worker
processes (SIGTERM hands an async attempt back, SIGKILL reruns it) are at
the end.  On memory, SQLite, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import kew
from kew.task import (
    App,
    Intervals,
    NoRetry,
    Permanent,
    SqliteTaskStore,
    TimeLimitExceeded,
    _async_run,
    current,
)
from kew.testing.util import wait_for
from tests.task_apps import app_fixture, broker_url, final, suffix


class Job(msgspec.Struct, frozen=True):
    n: int
    fail: int = 0  # attempts that fail before one succeeds
    sleep: float = 0.0
    permanent: bool = False


app = app_fixture()


def test_async_handler_runs_on_the_loop_with_context_retries_and_output(app: App) -> None:
    seen: list[tuple[int, int, str, bool]] = []
    loops: set[int] = set()

    @app.task(f"t.async-{suffix()}", retry=Intervals([0.2, 0.2]))
    async def work(job: Job) -> None:
        ctx = current()
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0.01)
        assert current() is ctx  # still after an await
        seen.append(
            (job.n, ctx.attempt, ctx.id, threading.current_thread().name.startswith("kew-loop"))
        )
        ctx.log(f"job {job.n} attempt {ctx.attempt}")
        if ctx.attempt <= job.fail:
            if job.permanent:
                raise Permanent(f"job {job.n} cannot be done")
            raise ValueError(f"job {job.n} failed in attempt {ctx.attempt}")

    w = app.worker(concurrency=4, record=True).start()
    try:
        ok = work.submit(Job(1, fail=2))
        bad = work.submit(Job(2, fail=9, permanent=True))
        r_ok, r_bad = final(app, ok), final(app, bad)
    finally:
        w.stop()
    assert (r_ok.status, r_ok.attempt) == ("succeeded", 3)
    assert (r_bad.status, r_bad.attempt) == ("failed", 1)
    assert "job 2 cannot be done" in r_bad.last_error
    assert [a for n, a, _, _ in seen if n == 1] == [1, 2, 3]
    assert all(tid == ok for n, _, tid, _ in seen if n == 1)
    assert all(on_loop for *_, on_loop in seen), "ran on the app's event loop thread"
    assert len(loops) == 1
    out, _ = app.output(ok)
    assert "job 1 attempt 1\n" in out and "job 1 attempt 3\n" in out
    assert "ValueError: job 1 failed in attempt 2" in out
    assert work.queue.browser().stats().dead == 1


def test_time_limit_cancels_the_coroutine_and_the_policy_retries(app: App) -> None:
    cancelled: list[int] = []

    @app.task(f"t.limit-{suffix()}", retry=Intervals([0.1]), time_limit=0.3)
    async def slow(job: Job) -> None:
        try:
            await asyncio.sleep(job.sleep if current().attempt == 1 else 0)
        except asyncio.CancelledError:
            cancelled.append(current().attempt)
            raise

    w = app.worker(concurrency=2, record=True).start()
    try:
        started = time.monotonic()
        tid = slow.submit(Job(1, sleep=30))
        r = final(app, tid)
        took = time.monotonic() - started
    finally:
        w.stop()
    assert (r.status, r.attempt) == ("succeeded", 2)
    assert cancelled == [1]
    assert took < 10, f"the 30 s sleep was not cut short ({took:.1f} s)"
    out, _ = app.output(tid)
    assert "TimeLimitExceeded: time limit of 0.3 s exceeded" in out


def test_a_handler_that_swallows_the_cancel_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same code on every provider: memory is enough."""
    app = App("memory://", store=SqliteTaskStore(tmp_path / "tasks.sqlite3"))
    monkeypatch.setattr(_async_run, "CANCEL_GRACE", 0.3)
    release = asyncio.Event()

    async def stubborn(job: Job) -> None:
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if release.is_set():
                    return
                continue  # swallows the cancel and goes on

    tq = app.task_queue(f"t.stubborn-{suffix()}", Job, stubborn, retry=NoRetry(), time_limit=0.2)
    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = tq.submit(Job(1))
        r = final(app, tid)
    finally:
        app.event_loop.loop.call_soon_threadsafe(release.set)
        w.stop()
        app.close()
    assert r.status == "failed"
    assert "did not stop within 0.3 s of its cancel" in r.last_error
    assert isinstance(TimeLimitExceeded("x"), Exception)


def test_cancel_on_request_cancels_a_running_coroutine(app: App) -> None:
    began = threading.Event()
    cancelled = threading.Event()

    @app.task(f"t.cancel-{suffix()}")
    async def long(job: Job) -> None:
        began.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = long.submit(Job(1))
        assert began.wait(20), "the task did not start"
        wait_for(lambda: app.status(tid) is not None, 20, what="the task recorded")
        app.cancel(tid)
        r = final(app, tid)
    finally:
        w.stop()
    assert r.status == "cancelled"
    assert cancelled.is_set()


def test_sync_and_async_queues_side_by_side_and_async_ones_overlap(app: App) -> None:
    done: list[str] = []

    @app.task(f"t.sync-{suffix()}")
    def plain(job: Job) -> None:
        done.append(f"sync {job.n}")

    @app.task(f"t.overlap-{suffix()}", concurrency=8)
    async def waits(job: Job) -> None:
        await asyncio.sleep(0.5)
        done.append(f"async {job.n}")

    w = app.worker(concurrency=2, record=True).start()
    try:
        started = time.monotonic()
        ids = [waits.submit(Job(i)) for i in range(8)] + [plain.submit(Job(i)) for i in range(4)]
        records = [final(app, t) for t in ids]
        took = time.monotonic() - started
    finally:
        w.stop()
    assert {r.status for r in records} == {"succeeded"}
    assert sorted(done) == sorted(
        [f"async {i}" for i in range(8)] + [f"sync {i}" for i in range(4)]
    )
    assert took < 3.5, f"8 async tasks of 0.5 s on 8 slots took {took:.1f} s: they did not overlap"


def test_local_call_of_an_async_task_is_awaitable() -> None:
    with App("memory://", events=False) as app:

        @app.task("t.local")
        async def double(n: int) -> int:
            current().log("local")
            return n * 2

        assert asyncio.run(double(21)) == 42  # type: ignore[arg-type]


def test_time_limit_needs_an_async_handler() -> None:
    with App("memory://", events=False) as app:

        def plain(n: int) -> None: ...

        with pytest.raises(TypeError, match="time_limit needs an async def handler"):
            app.task_queue("t.plain", int, plain, time_limit=1)
        with pytest.raises(ValueError, match="time_limit must be positive"):
            app.task(time_limit=0)(_async_noop)


async def _async_noop(n: int) -> None:
    return None


# -- worker processes ---------------------------------------------------------

APP = r"""
import asyncio, os
from pathlib import Path
from kew.task import App, current

app = App(os.environ["T_URL"], store=os.environ["T_STORE"],
          events_queue="t.events-" + os.environ["T_SUFFIX"])
GATE = Path(os.environ["T_GATE"])

@app.task("t.aslow-" + os.environ["T_SUFFIX"])
async def slow(name: str) -> None:
    ctx = current()
    Path(os.environ["T_STARTED"], ctx.worker).touch()
    ctx.log(f"{name}: start on {ctx.worker}")
    try:
        while not GATE.exists():
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        Path(os.environ["T_CANCELLED"], ctx.worker).touch()
        raise
    ctx.log(f"{name}: done on {ctx.worker}")
"""


@pytest.fixture
def proc_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    url = broker_url("redis", tmp_path, lease=1)
    tail = suffix()
    (tmp_path / "started").mkdir()
    (tmp_path / "app.py").write_text(APP)
    e = {
        "T_URL": url,
        "T_STORE": f"sqlite:///{tmp_path}/tasks.sqlite3",
        "T_SUFFIX": tail,
        "T_GATE": str(tmp_path / "gate"),
        "T_STARTED": str(tmp_path / "started"),
        "T_CANCELLED": str(tmp_path / "cancelled"),
    }
    (tmp_path / "cancelled").mkdir()
    yield e
    c = kew.connect(e["T_URL"])
    for name in (f"t.aslow-{tail}", f"t.events-{tail}"):
        c.delete(name)
    c.close()


def _worker(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"worker-{suffix()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "kew.cli", "worker", f"{tmp_path / 'app.py'}:app", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "KEW_LOG_LEVEL": "info"},
    )


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker-*.log")))


def test_worker_processes_sigterm_hands_back_and_sigkill_reruns(
    proc_env: dict[str, str], tmp_path: Path
) -> None:
    from kew.cli import load_app

    os.environ.update(proc_env)
    app = load_app(f"{tmp_path / 'app.py'}:app")
    rec = app.recorder()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tq = next(iter(app.queues.values()))
        a = _worker(tmp_path, proc_env, "--concurrency", "1", "--grace", "0.5")
        procs.append(a)
        tid = tq.submit("job")
        first = wait_for(lambda: os.listdir(tmp_path / "started"), 30, what="worker A to start")[0]
        # SIGTERM with a grace shorter than the task: the coroutine is cancelled, handed back
        os.kill(a.pid, signal.SIGTERM)
        assert a.wait(30) == 0, _logs(tmp_path)
        assert os.listdir(tmp_path / "cancelled") == [first]  # the coroutine was cancelled
        wait_for(
            lambda: f"worker {first} stopped: attempt 1 handed back" in app.output(tid)[0],
            20,
            what="the hand-back recorded",
        )
        b = _worker(tmp_path, proc_env, "--concurrency", "1")
        procs.append(b)
        wait_for(lambda: len(os.listdir(tmp_path / "started")) == 2, 30, what="B to start it")
        second = next(w for w in os.listdir(tmp_path / "started") if w != first)
        os.kill(b.pid, signal.SIGKILL)  # mid-task: C runs it again
        b.wait()
        c = _worker(tmp_path, proc_env, "--concurrency", "1")
        procs.append(c)
        wait_for(lambda: len(os.listdir(tmp_path / "started")) == 3, 30, what="C to start it")
        (tmp_path / "gate").touch()
        r = final(app, tid)
        assert (r.status, r.attempt) == ("succeeded", 1)
        assert r.worker not in (first, second)
        out = app.output(tid)[0]
        assert out.endswith(f"job: done on {r.worker}\n"), out
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        rec.stop(5)
        app.close()
        for k in proc_env:
            os.environ.pop(k, None)
