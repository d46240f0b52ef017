"""Two OS processes consuming one SQLite queue file."""

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import kew
from kew.testing.util import wait_for

CONSUMER = r"""
import os, sys, threading, time, kew
from kew.testing.util import wait_for
url, barrier = sys.argv[1], sys.argv[2]
q = kew.Queue(kew.connect(url), "shared", int)
open(os.path.join(barrier, str(os.getpid())), "w").close()
wait_for(lambda: len(os.listdir(barrier)) == 2, 60, what="the other process")
lock = threading.Lock()
def take(i):
    with lock:
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
    time.sleep(0.002)  # a little work, so that both processes get some
with q.sink(take, concurrency=2):
    wait_for(lambda: q.browser().stats().ready == 0 and q.browser().stats().in_flight == 0, 60)
"""


def test_two_processes_share_one_queue_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite3?lease=5"
    q = kew.Queue(kew.connect(url), "shared", int)
    q.send_many(range(400))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, url, str(barrier)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    got = [[int(line) for line in out.split()] for out in outputs]
    assert sorted(got[0] + got[1]) == list(range(400))  # each exactly once
    assert got[0] and got[1], "both processes should have taken some of the work"
    assert q.browser().stats() == kew.QueueStats(0, 0, 0, 0)


def test_send_survives_reopen_and_is_fsynced_by_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/d.sqlite3"
    c = kew.connect(url)
    assert c.options.sync == "full"  # type: ignore[attr-defined]
    kew.Queue(c, "q", str).send("kept")
    c.close()
    assert kew.Queue(kew.connect(url), "q", str).browser().peek() == ["kept"]


def test_sqlite_url_errors(tmp_path: Path) -> None:
    with pytest.raises(kew.ConfigError, match="name a file, not a host"):
        kew.connect("sqlite://host/x.db")
    with pytest.raises(kew.ConfigError, match="does not exist"):
        kew.connect(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(kew.ConfigError, match=r"option lease='soon'.*expected a number"):
        kew.connect(f"sqlite:///{tmp_path}/x.db?lease=soon")
    with pytest.raises(kew.ConfigError, match=r"unknown option.*leese"):
        kew.connect(f"sqlite:///{tmp_path}/x.db?leese=3")


# -- fork ------------------------------------------------------------------------------


def _round_trip(q: kew.Queue[str], text: str) -> None:
    got: list[str] = []
    with q.sink(got.append):
        q.send(text)
        wait_for(lambda: got == [text], 10, what=f"{text!r} consumed")


def _child_exit(work: Callable[[], None], report: Path) -> None:
    """Run ``work`` in a forked child and leave with its outcome (0: done),
    the error written to ``report`` (the child never returns to pytest)."""
    try:
        work()
    except BaseException as e:
        report.write_text(f"the child failed: {e!r}")
        os._exit(1)
    os._exit(0)


def _start(how: str, work: Callable[[], None], report: Path) -> Callable[[], int | None]:
    """Run ``work`` in a child made by ``how``; returns the wait for its
    exit code (None: it was still running after 60 s and was killed)."""
    if how == "multiprocessing":
        p = multiprocessing.get_context("fork").Process(target=_child_exit, args=(work, report))
        p.start()

        def join() -> int | None:
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()
                return None
            return p.exitcode

        return join
    pid = os.fork()
    if pid == 0:
        _child_exit(work, report)

    def wait() -> int | None:
        status: list[int] = []

        def reaped() -> bool:
            done, st = os.waitpid(pid, os.WNOHANG)
            status.append(st)
            return done != 0

        try:
            wait_for(reaped, 60, what="the child")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        return os.waitstatus_to_exitcode(status[-1])

    return wait


def _outcome(code: int | None, report: Path) -> str:
    return report.read_text() if report.exists() else f"the child's exit code: {code}"


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_connector_works_in_a_forked_child_and_still_in_the_parent(
    how: str, tmp_path: Path
) -> None:
    """The child sends and consumes its own message with its parent's
    connector (and sends one to the parent through the parent's Queue and
    its producer), while the parent's consumer runs across the fork."""
    c = kew.connect(f"sqlite:///{tmp_path}/fork.sqlite3?lease=1")
    q = kew.Queue(c, "parent", str)
    report = tmp_path / "child.txt"
    _round_trip(q, "before the fork")
    got: list[str] = []

    def in_child() -> None:
        _round_trip(kew.Queue(c, "child", str), f"from child {os.getpid()}")
        q.send("to the parent")

    with q.sink(got.append) as sub:  # the parent's consumer runs across the fork
        q.send("during")
        wait_for(lambda: got == ["during"], 10, what="the parent's message")
        code = _start(how, in_child, report)()
        assert code == 0, _outcome(code, report)
        wait_for(lambda: got == ["during", "to the parent"], 10, what="the child's message")
        q.send("after")
        wait_for(lambda: got[2:] == ["after"], 10, what="the parent, after the fork")
        assert sub.alive and sub.healthy()
    _round_trip(q, "after the fork")
    assert kew.Queue(c, "child", str).browser().stats() == kew.QueueStats(0, 0, 0, 0)
    assert q.browser().stats() == kew.QueueStats(0, 0, 0, 0)
    c.close()


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_child_keeps_its_sends_when_the_parent_closes_first(how: str, tmp_path: Path) -> None:
    """The parent closes its connector (its last connection to the file)
    while its child is connected: SQLite must not take the file for unused
    and drop its write-ahead log under the child, whose sends would then be
    lost.  (It did when the child used connections inherited from the
    parent: SQLite counted the parent's locks as the child's.)"""
    url = f"sqlite:///{tmp_path}/fork.sqlite3"
    c = kew.connect(url)
    q = kew.Queue(c, "jobs", str)
    q.send("from the parent")
    report = tmp_path / "child.txt"
    connected = tmp_path / "connected"
    closed = tmp_path / "closed"

    def in_child() -> None:
        assert q.browser().stats().ready == 1  # connected: the file and its log are open
        connected.touch()
        wait_for(closed.exists, 30, what="the parent to close its connector")
        q.send("from the child")

    wait = _start(how, in_child, report)
    wait_for(connected.exists, 30, what="the child connected")
    q.close()  # its producer's connection
    c.close()
    closed.touch()
    code = wait()
    assert code == 0, _outcome(code, report)
    assert kew.Queue(kew.connect(url), "jobs", str).browser().peek() == [
        "from the parent",
        "from the child",
    ]


# -- the default URL -------------------------------------------------------------------


def test_the_default_url_logs_its_file_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """kew.connect() without a URL (nor KEW_URL) uses ./kew.sqlite3: the
    absolute path is logged at INFO, once; an explicit URL logs nothing."""
    from kew.connect import DEFAULT_URL
    from kew.embedded import sqlite

    assert sqlite.DEFAULT_URL == DEFAULT_URL
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEW_URL", raising=False)
    monkeypatch.setattr(sqlite, "_announced_in", None)
    caplog.set_level(logging.INFO, logger="kew.sqlite")

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "kew.sqlite"]

    kew.connect(f"sqlite:///{tmp_path}/other.sqlite3").close()
    assert logged() == []
    for _ in range(2):
        kew.connect().close()
    assert [r.levelno for r in logged()] == [logging.INFO]
    assert str(tmp_path / "kew.sqlite3") in logged()[0].getMessage()
    assert (tmp_path / "kew.sqlite3").exists()
