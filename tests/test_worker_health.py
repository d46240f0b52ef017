"""``kew worker``'s health follows the truth, seen from outside: its
``--health-file`` exists while every consumer fetches, goes away while
fetches fail (an SQLite file locked by another process) and comes back once
they work again; a consumer that can never fetch again (its database file
deleted, replaced, overwritten) stops the worker with exit code 1 and one
line naming the queue."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kew.cli import load_app
from kew.testing.util import wait_for

ROOT = Path(__file__).resolve().parent.parent

APP = r"""
import os
from pathlib import Path
from kew.task import App

app = App(os.environ["T_URL"], store=os.environ["T_STORE"])

@app.task("jobs")
def job(n: int) -> None:
    Path(os.environ["T_DONE"], str(n)).touch()
"""


class Worker:
    """A ``kew worker`` process on an SQLite file in a temp dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "q.sqlite3"
        self.health = tmp / "healthy"
        self.done = tmp / "done"
        self.done.mkdir()
        (tmp / "app.py").write_text(APP)
        # busy_timeout: a locked file fails a fetch in 0.2 s, not 30
        self.env = {
            "T_URL": f"sqlite:///{self.db}?busy_timeout=0.2&lease=1",
            "T_STORE": f"sqlite:///{tmp / 'tasks.sqlite3'}",
            "T_DONE": str(self.done),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
        env.update({"PYTHONPATH": str(ROOT), **self.env})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kew.cli",
                "worker",
                f"{tmp / 'app.py'}:app",
                "--health-file",
                str(self.health),
                "--stall-after",
                "1",
                "--grace",
                "5",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def submit(self, n: int) -> None:
        os.environ.update(self.env)
        app = load_app(f"{self.tmp / 'app.py'}:app")
        try:
            app.queues["jobs"].submit(n)
        finally:
            app.close()

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the worker did not exit within {timeout}s:\n{err}") from None
        return self.proc.returncode, err


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    old = {k: os.environ.get(k) for k in ("T_URL", "T_STORE", "T_DONE")}
    w = Worker(tmp_path)
    try:
        wait_for(w.health.exists, 20, what="the health file of a worker that started")
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.communicate()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_health_file_follows_fetches_failing_and_recovering(worker: Worker) -> None:
    raw = sqlite3.connect(worker.db, isolation_level=None)
    raw.execute("BEGIN EXCLUSIVE")  # another process holds the lock: every claim fails
    try:
        wait_for(lambda: not worker.health.exists(), 10, what="the health file removed")
        assert worker.proc.poll() is None, "a passing fault must not stop the worker"
    finally:
        raw.execute("ROLLBACK")
        raw.close()
    wait_for(worker.health.exists, 10, what="the health file back")
    worker.submit(7)
    wait_for(lambda: (worker.done / "7").exists(), 10, what="the worker to run a task again")
    worker.proc.send_signal(signal.SIGTERM)
    code, err = worker.wait()
    assert code == 0, err
    assert not worker.health.exists()


def _delete(db: Path) -> None:
    db.unlink()


def _replace(db: Path) -> None:
    other = db.with_name("other")
    other.write_bytes(b"not a database " * 1000)
    other.replace(db)


def _overwrite(db: Path) -> None:
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # so that SQLite reads the file itself
    raw.close()
    with db.open("r+b") as f:
        f.write(b"not a database " * 1000)


@pytest.mark.parametrize(
    ("damage", "words"),
    [(_delete, "was deleted"), (_replace, "was replaced"), (_overwrite, "not a database")],
    ids=["deleted", "replaced", "overwritten"],
)
def test_a_consumer_failed_for_good_stops_the_worker_with_exit_code_1(
    worker: Worker, damage: object, words: str
) -> None:
    assert callable(damage)
    damage(worker.db)
    code, err = worker.wait()
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert last.startswith("kew: error: the consumer of queue 'jobs' failed"), err
    assert words in last and str(worker.db) in last, last
    assert "cannot recover" in err and "ERROR" in err  # logged at ERROR before the stop
    assert not worker.health.exists()
