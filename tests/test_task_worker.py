"""Worker processes (``kew worker``): SIGKILL mid-task, SIGTERM
with and without time to finish, a second signal; on SQLite and Redis.

Each test writes a small app module into its temp dir; the worker processes
and the test share the broker and the task store (an SQLite file), and the
test process runs the recorder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kew
from kew.cli import load_app
from kew.task import App, TaskQueue, TaskRecord
from kew.testing.util import port_open, require, wait_for

APP = r"""
import os, time
from pathlib import Path
from kew.task import App, Intervals, current

app = App(os.environ["T_URL"], store=os.environ["T_STORE"],
          events_queue="t.events-" + os.environ["T_SUFFIX"])
GATE = Path(os.environ["T_GATE"])

@app.task("t.slow-" + os.environ["T_SUFFIX"], retry=Intervals([0.2]))
def slow(name: str) -> None:
    ctx = current()
    ctx.log(f"{name}: start on {ctx.worker}")
    Path(os.environ["T_STARTED"], ctx.worker).touch()
    ticks = 0
    while not GATE.exists():          # runs until the test opens the gate
        time.sleep(0.05)
        ticks += 1
        if ticks % 4 == 0:
            ctx.log(f"{name}: tick")
    ctx.log(f"{name}: done on {ctx.worker}")
"""


@pytest.fixture(params=["sqlite", "redis", "rabbitmq"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    suffix = os.urandom(4).hex()
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/q.sqlite3?lease=1"
    elif request.param == "rabbitmq":
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
        url = "amqp://guest:guest@127.0.0.1:5672/"
    else:
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        url = "redis://127.0.0.1:6379/0?lease=1"
    (tmp_path / "started").mkdir()
    (tmp_path / "app.py").write_text(APP)
    e = {
        "T_URL": url,
        "T_STORE": f"sqlite:///{tmp_path}/tasks.sqlite3",
        "T_SUFFIX": suffix,
        "T_GATE": str(tmp_path / "gate"),
        "T_STARTED": str(tmp_path / "started"),
    }
    old = {k: os.environ.get(k) for k in e}
    os.environ.update(e)
    yield e
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if not url.startswith("sqlite"):
        c = kew.connect(url)
        for name in (f"t.slow-{suffix}", f"t.events-{suffix}"):
            c.delete(name)
        c.close()


class Workers:
    """Worker processes of the test's app, stopped by pid at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker{len(self.procs)}.log").open("wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "kew.cli", "worker", f"{self.tmp / 'app.py'}:app", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KEW_LOG_LEVEL": "info"},
        )
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("worker*.log")))

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def app(env: dict[str, str], tmp_path: Path) -> Iterator[App]:
    a = load_app(f"{tmp_path / 'app.py'}:app")
    rec = a.recorder()
    yield a
    rec.stop(5)
    a.close()


def started_by(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "started"))


def _held(tq: TaskQueue[str]) -> int:
    """Messages on the queue, ready or held (a released Redis entry stays
    pending until the next consumer claims it)."""
    s = tq.queue.browser().stats()  # (-1: a count the broker cannot tell)
    return max(s.ready, 0) + max(s.in_flight, 0) + max(s.delayed, 0)


def status(app: App, tid: str) -> TaskRecord | None:
    return app.status(tid)


def wait_status(app: App, tid: str, want: str, timeout: float = 30) -> TaskRecord:
    def check() -> TaskRecord | None:
        r = app.status(tid)
        return r if r is not None and r.status == want else None

    r = wait_for(check, timeout, what=f"task {tid} to be {want}")
    assert r is not None
    return r


def test_sigkill_mid_task_runs_again_on_another_worker(
    app: App, workers: Workers, tmp_path: Path
) -> None:
    tq = next(iter(app.queues.values()))
    a = workers.start("--concurrency", "1")
    tid = tq.submit("job")
    first = wait_for(lambda: started_by(tmp_path), 30, what="worker A to start the task")[0]
    wait_for(lambda: "job: tick" in app.output(tid)[0], 30, what="A's output in the store")
    assert wait_status(app, tid, "running").worker == first
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    workers.start("--concurrency", "1")
    wait_for(lambda: len(started_by(tmp_path)) == 2, 30, what="worker B to start the task")
    second = next(w for w in started_by(tmp_path) if w != first)
    (tmp_path / "gate").touch()
    r = wait_status(app, tid, "succeeded")
    assert r.attempt == 1  # a crash is not a failed attempt: the same attempt ran again
    assert r.worker == second
    text, _ = app.output(tid)
    head, sep, tail = text.partition(
        "--- attempt 1 (run again: its last run was interrupted) ---\n"
    )
    assert sep, text
    assert head.startswith(f"job: start on {first}\n") and "done" not in head
    assert tail.startswith(f"job: start on {second}\n")
    assert tail.endswith(f"job: done on {second}\n")
    wait_for(lambda: _held(tq) == 0, 10, what="the queue empty")
    assert tq.queue.browser().stats().dead == 0


def test_sigterm_lets_a_running_task_finish(app: App, workers: Workers, tmp_path: Path) -> None:
    tq = next(iter(app.queues.values()))
    w = workers.start("--concurrency", "2", "--grace", "30")
    tid = tq.submit("finishing")
    wait_for(lambda: started_by(tmp_path), 30, what="the task to start")
    os.kill(w.pid, signal.SIGTERM)
    wait_for(lambda: "taking no more work" in workers.logs(), 10, what="the signal seen")
    second = tq.submit("not taken")  # a stopping worker takes no new work
    assert w.poll() is None, "the worker should wait for its running task"
    (tmp_path / "gate").touch()
    assert w.wait(30) == 0, workers.logs()
    r = wait_status(app, tid, "succeeded")
    assert r.attempt == 1
    assert app.output(tid)[0].endswith(f"finishing: done on {r.worker}\n")
    rec = app.status(second)
    assert rec is not None and rec.status == "queued"
    # still there (a released Redis entry counts as in flight)
    assert (_held(tq), tq.queue.browser().stats().dead) == (1, 0)


def test_sigterm_past_grace_hands_the_task_back(app: App, workers: Workers, tmp_path: Path) -> None:
    tq = next(iter(app.queues.values()))
    w = workers.start("--concurrency", "1", "--grace", "0.5")
    tid = tq.submit("long")
    first = wait_for(lambda: started_by(tmp_path), 30, what="the task to start")[0]
    wait_status(app, tid, "running")
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait(30) == 0, workers.logs()
    # handed back: queued again in the store, not "running" forever, and not lost
    r = wait_status(app, tid, "queued")
    assert r.attempt == 1
    assert f"[kew] worker {first} stopped: attempt 1 handed back" in app.output(tid)[0]
    wait_for(lambda: _held(tq) == 1, 30, what="the task back on its queue")
    workers.start("--concurrency", "1")
    wait_for(lambda: len(started_by(tmp_path)) == 2, 30, what="another worker to take it")
    (tmp_path / "gate").touch()
    r = wait_status(app, tid, "succeeded")
    assert r.attempt == 1 and r.worker != first


def test_second_signal_hands_back_at_once(app: App, workers: Workers, tmp_path: Path) -> None:
    tq = next(iter(app.queues.values()))
    w = workers.start("--concurrency", "1", "--grace", "600")
    tid = tq.submit("impatient")
    wait_for(lambda: started_by(tmp_path), 30, what="the task to start")
    wait_status(app, tid, "running")
    os.kill(w.pid, signal.SIGTERM)
    wait_for(lambda: "stopping (grace" in workers.logs(), 10, what="the first signal seen")
    os.kill(w.pid, signal.SIGINT)
    w.wait(30)  # well before the 600 s grace
    r = wait_status(app, tid, "queued")
    assert r.attempt == 1
    assert _held(tq) == 1
