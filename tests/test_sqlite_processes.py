"""Two OS processes consuming one SQLite queue file."""

import subprocess
import sys
from pathlib import Path

import kew

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
    import pytest

    with pytest.raises(kew.ConfigError, match="name a file, not a host"):
        kew.connect("sqlite://host/x.db")
    with pytest.raises(kew.ConfigError, match="does not exist"):
        kew.connect(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(kew.ConfigError, match=r"option lease='soon'.*expected a number"):
        kew.connect(f"sqlite:///{tmp_path}/x.db?lease=soon")
    with pytest.raises(kew.ConfigError, match=r"unknown option.*leese"):
        kew.connect(f"sqlite:///{tmp_path}/x.db?leese=3")
