"""``kew worker --processes N``: N ordinary ``kew worker`` processes under a
supervisor, on SQLite (leases of 1 s, so that what a killed process held is
delivered again within a second or two).

* a child SIGKILLed in the middle of a task is started again, and the task
  is delivered again and succeeds;
* SIGTERM to the supervisor: every child stops gracefully (the running task
  finishes within the grace period), exit code 0, no child left;
* a child whose consumer failed for good (exit code 1: its database file
  was deleted) is started again and works;
* children that keep dying (the database file replaced by garbage): the
  supervisor gives up with exit code 1 and says why;
* the supervisor killed: its children notice and stop by themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
import time
from pathlib import Path
from kew.task import App

app = App(os.environ["T_URL"], store=os.environ["T_STORE"])
DIR = Path(os.environ["T_DIR"])

@app.task("jobs")
def job(name: str) -> None:
    (DIR / f"{name}.started.{os.getpid()}").touch()
    go = DIR / f"{name}.go"
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the task's work: it goes on once the test says so
    (DIR / f"{name}.done.{os.getpid()}").touch()
"""


def children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(d.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Pool:
    """``kew worker app.py:app --processes N`` in a temp dir."""

    def __init__(self, tmp: Path, processes: int = 2, grace: float = 20) -> None:
        self.tmp = tmp
        self.db = tmp / "q.sqlite3"
        self.health = tmp / "healthy"
        self.dir = tmp / "marks"
        self.dir.mkdir()
        (tmp / "app.py").write_text(APP)
        self.env = {
            "T_URL": f"sqlite:///{self.db}?lease=1&busy_timeout=0.5",
            "T_STORE": f"sqlite:///{tmp / 'tasks.sqlite3'}",
            "T_DIR": str(self.dir),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
        env.update({"PYTHONPATH": str(ROOT), **self.env})
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "kew.cli", "worker", f"{tmp / 'app.py'}:app"),
                *("--processes", str(processes), "--record", "--grace", str(grace)),
                *("--health-file", str(self.health), "--stall-after", "2"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def app(self) -> object:
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return load_app(f"{self.tmp / 'app.py'}:app")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def submit(self, name: str) -> str:
        app = self.app()
        try:
            return str(app.queues["jobs"].submit(name))  # type: ignore[attr-defined]
        finally:
            app.close()  # type: ignore[attr-defined]

    def status(self, task_id: str) -> str:
        app = self.app()
        try:
            r = app.status(task_id)  # type: ignore[attr-defined]
            return str(r.status) if r is not None else ""
        finally:
            app.close()  # type: ignore[attr-defined]

    def marks(self, name: str, what: str) -> list[int]:
        """The pids that started (or finished) task ``name``."""
        return sorted(int(p.name.rsplit(".", 1)[1]) for p in self.dir.glob(f"{name}.{what}.*"))

    def children(self) -> list[int]:
        return children(self.proc.pid)

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the supervisor did not exit within {timeout}s:\n{err}") from None
        return self.proc.returncode, err

    def kill_all(self) -> None:
        for pid in [*self.children(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.communicate()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path)
    try:
        wait_for(p.health.exists, 60, what="the health file: every process healthy")
        assert len(p.children()) == 2
        yield p
    finally:
        if p.proc.poll() is None:
            p.kill_all()


def test_a_killed_process_is_started_again_and_its_task_runs_again(pool: Pool) -> None:
    first = pool.children()
    for n in (1, 2):
        assert Path(f"{pool.health}.{n}").exists()  # each its own health file
    task_id = pool.submit("a")
    (killed,) = wait_for(lambda: pool.marks("a", "started"), 30, what="the task to start")
    assert killed in first
    os.kill(killed, signal.SIGKILL)
    (pool.dir / "a.go").touch()

    wait_for(lambda: pool.status(task_id) == "succeeded", 60, what="the task to succeed")
    (finished,) = pool.marks("a", "done")
    assert finished != killed and killed in pool.marks("a", "started")  # delivered again

    def replaced() -> list[int]:
        now = pool.children()
        return now if len(now) == 2 and killed not in now else []

    now = wait_for(replaced, 30, what="a new process in place of the killed one")
    assert len(set(now) - set(first)) == 1
    wait_for(pool.health.exists, 30, what="the health file back")
    assert pool.proc.poll() is None

    pool.proc.send_signal(signal.SIGTERM)
    code, err = pool.wait(60)
    assert code == 0, err
    assert f"(pid {killed}) was killed by SIGKILL; starting it again" in err, err


def test_sigterm_stops_every_process_gracefully(pool: Pool) -> None:
    kids = pool.children()
    task_id = pool.submit("b")
    wait_for(lambda: pool.marks("b", "started"), 30, what="the task to start")
    pool.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not pool.health.exists(), 10, what="the health file removed at the stop")
    assert pool.marks("b", "done") == []  # still running: within its grace period
    (pool.dir / "b.go").touch()
    code, err = pool.wait(30)  # (grace 20 s)
    assert code == 0, err
    assert "Traceback" not in err
    assert not any(alive(pid) for pid in kids)
    assert pool.marks("b", "done") != []
    assert pool.status(task_id) == "succeeded"  # finished, not handed back
    assert not any(Path(f"{pool.health}.{n}").exists() for n in (1, 2))


def test_a_process_whose_consumer_failed_is_started_again(pool: Pool) -> None:
    first = pool.children()
    pool.db.unlink()  # each consumer fails for good: exit code 1
    wait_for(
        lambda: not set(first) & set(pool.children()) and len(pool.children()) == 2,
        60,
        what="both processes started again",
    )
    wait_for(pool.health.exists, 60, what="the health file back")
    task_id = pool.submit("c")
    (pool.dir / "c.go").touch()
    wait_for(lambda: pool.status(task_id) == "succeeded", 60, what="a task run again")
    pool.proc.send_signal(signal.SIGTERM)
    code, err = pool.wait(60)
    assert code == 0, err
    assert "the consumer of queue 'jobs' failed" in err
    assert "exited with 1; starting it again" in err


def test_processes_that_keep_dying_make_the_supervisor_give_up(pool: Pool) -> None:
    kids = pool.children()
    other = pool.db.with_name("other")
    other.write_bytes(b"not a database " * 1000)
    other.replace(pool.db)  # every process fails, and fails again at each start
    code, err = pool.wait(120)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kew: error: worker processes keep dying: 6 deaths within 60 s"), last
    assert not any(alive(pid) for pid in kids)
    assert not pool.health.exists()


def test_the_processes_stop_when_the_supervisor_is_killed(pool: Pool) -> None:
    kids = pool.children()
    pool.proc.kill()
    pool.proc.communicate()
    wait_for(lambda: not any(alive(pid) for pid in kids), 30, what="the orphans to stop")


def test_a_bad_app_is_one_line_before_any_process_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [sys.executable, "-m", "kew.cli", "worker", "nosuch_module_x:app", "--processes", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    message = "kew: error: cannot load 'nosuch_module_x:app': no module named 'nosuch_module_x'"
    assert r.stderr.strip() == message
