"""kew.idempotency on real backends: memory, SQLite, and the machine's Redis."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.idempotency import IdempotencyStore, StillClaimed, open_store
from kew.testing.util import port_open, require, wait_for

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["memory", "sqlite", "redis"]


def backend_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return f"memory://idem-{os.urandom(4).hex()}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'idem.sqlite3'}"
    require(port_open("127.0.0.1", 6379), "no Redis at 127.0.0.1:6379")
    return f"redis://127.0.0.1:6379/15?prefix=idem-{os.urandom(4).hex()}"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def conn(kind: str, tmp_path: Path) -> Iterator[Any]:
    c: Any = kew.connect(backend_url(kind, tmp_path))
    yield c
    if kind == "redis":  # leave the shared Redis as it was
        for k in c.redis.scan_iter(f"{c.options.prefix}:*"):
            c.redis.delete(k)
    c.close()


@pytest.fixture
def store(conn: Any) -> Iterator[IdempotencyStore]:
    s = open_store(conn, "tests", lease=0.6)
    yield s
    s.close()


def test_once_runs_the_effect_once(store: IdempotencyStore) -> None:
    effects: list[str] = []
    for _ in range(3):
        with store.once("task-1") as first:
            if first:
                effects.append("task-1")
    assert effects == ["task-1"]
    assert store.state("task-1") == "done" and store.is_done("task-1")
    assert store.run_once("task-2", lambda: effects.append("task-2")) is True
    assert store.run_once("task-2", lambda: effects.append("task-2")) is False
    assert effects == ["task-1", "task-2"]
    assert store.state("task-3") is None


def test_a_failed_effect_drops_the_claim(store: IdempotencyStore) -> None:
    with pytest.raises(RuntimeError, match="smtp down"), store.once("mail-7") as first:
        assert first
        raise RuntimeError("smtp down")
    assert store.state("mail-7") is None  # not done, not claimed: a retry runs it
    assert store.run_once("mail-7", lambda: None) is True


def test_a_dead_claimers_key_is_claimable_after_its_lease(store: IdempotencyStore) -> None:
    # a runner that claimed and died: nobody extends its claim
    from kew.qchan.spi.dedupe import ClaimResult

    assert store.backend.claim("k", "dead-runner", 600) is ClaimResult.CLAIMED
    assert store.state("k") == "claimed"
    with pytest.raises(StillClaimed, match=r"'k'.*still claimed"), store.once("k", wait=0):
        pass
    ran = store.run_once("k", lambda: None, wait=5)  # waits for the lease to run out
    assert ran is True
    assert store.state("k") == "done"


def test_a_live_claim_is_extended_and_not_stolen(store: IdempotencyStore) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow() -> None:
        with store.once("slow") as first:
            assert first
            inside.set()
            release.wait(10)

    t = threading.Thread(target=slow)
    t.start()
    try:
        assert inside.wait(10)
        # well past two leases (0.6 s each): the keeper has extended it
        with pytest.raises(StillClaimed), store.once("slow", wait=1.5):
            pass
        assert store.state("slow") == "claimed"
    finally:
        release.set()
        t.join()
    assert store.run_once("slow", lambda: None, wait=0) is False


def test_concurrent_runners_do_each_key_once(store: IdempotencyStore) -> None:
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def effect(key: str) -> None:
        with lock:
            counts[key] += 1

    def runner() -> None:
        for i in range(30):
            key = f"key-{i}"
            store.run_once(key, functools.partial(effect, key), wait=10)

    threads = [threading.Thread(target=runner) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == Counter({f"key-{i}": 1 for i in range(30)})


def _atomic_effect(kind: str, conn: Any) -> tuple[Callable[[Any], object], Callable[[], int]]:
    """An effect written through the store's transaction, and its count."""
    if kind == "memory":
        box: list[int] = []
        return (lambda _h: box.append(1)), lambda: len(box)
    if kind == "sqlite":
        path = conn.options.path
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS effect (n INTEGER)")
        db = sqlite3.connect(path)

        def count() -> int:
            return int(db.execute("SELECT COUNT(*) FROM effect").fetchone()[0])

        return (lambda c: c.execute("INSERT INTO effect VALUES (1)")), count
    key = f"{conn.options.prefix}:effect"
    return (lambda pipe: pipe.incr(key)), lambda: int(conn.redis.get(key) or 0)


def test_atomic_once_writes_the_effect_with_the_mark(
    kind: str, conn: Any, store: IdempotencyStore
) -> None:
    effect, count = _atomic_effect(kind, conn)
    assert store.atomic_once("order-1", effect) is True
    assert store.atomic_once("order-1", effect) is False
    assert count() == 1
    assert store.state("order-1") == "done"

    def failing(handle: Any) -> None:
        if kind != "memory":  # memory has no transaction to roll back: it only serialises
            effect(handle)
        raise ValueError("bad order")

    with pytest.raises(ValueError, match="bad order"):
        store.atomic_once("order-2", failing)
    assert count() == 1  # the effect's write was rolled back (or never sent) with the mark
    assert store.state("order-2") is None
    assert store.atomic_once("order-2", effect) is True
    assert count() == 2


def test_retention_and_forget(kind: str, conn: Any) -> None:
    with open_store(conn, "short", retention=0.3) as s:
        assert s.run_once("k", lambda: None) is True
        assert s.run_once("k", lambda: None) is False
        wait_for(lambda: s.state("k") is None, 5, what="the done mark to expire")
        assert s.run_once("k", lambda: None) is True
        s.forget("k")
        assert s.state("k") is None
    with open_store(conn, "purged", retention=0.2) as s:
        for i in range(3):
            s.run_once(f"k{i}", lambda: None)
        time.sleep(0.3)  # past the retention (not a wait for a message)
        purged = s.purge_expired()
        # SQLite deletes the rows; memory drops them; Redis expires keys itself (-1)
        assert purged == {"sqlite": 3, "memory": 3, "redis": -1}[kind]
        assert s.purge_expired() in (0, -1)


def test_namespaces_are_separate(conn: Any) -> None:
    with open_store(conn, "a") as a, open_store(conn, "b") as b:
        assert a.run_once("k", lambda: None) is True
        assert b.run_once("k", lambda: None) is True
        assert a.state("k") == b.state("k") == "done"


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    conn = kew.connect("memory://idem-bad")
    with pytest.raises(ValueError, match="invalid idempotency namespace"):
        open_store(conn, "no spaces")
    with pytest.raises(ValueError, match="lease must be a positive"):
        open_store(conn, "x", lease=0)
    with pytest.raises(ValueError, match="retention must be positive"):
        open_store(conn, "x", retention=-1)
    with open_store(conn, "x") as s:
        with pytest.raises(ValueError, match="1-1000 characters"), s.once(""):
            pass
        with pytest.raises(TypeError, match="must be a str, not int"):
            s.run_once(42, lambda: None)  # type: ignore[arg-type]
        assert s.state("x") is None  # nothing was recorded


def test_a_store_url_for_brokers_without_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    with open_store(url, "imports") as s:
        assert s.run_once("t", lambda: None) is True
    with open_store(url, "imports") as s:  # durable: a new process would see it too
        assert s.state("t") == "done"


def test_a_broker_without_a_store_says_so() -> None:
    require(port_open("127.0.0.1", 5672), "no RabbitMQ at 127.0.0.1:5672")
    with pytest.raises(kew.ConfigError, match=r"cannot keep idempotency records.*sqlite:///"):
        open_store("amqp://guest:guest@127.0.0.1:5672/", "x")


_CRASHER = """
import os, sys, kew.idempotency as idem
store = idem.open_store(sys.argv[1], "crash", lease=float(sys.argv[3]))
with store.once("job") as first:
    assert first
    os.write(int(sys.argv[2]), b"effect\\n")  # the effect happened ...
    os.kill(os.getpid(), 9)                    # ... and the runner dies before marking it done
"""


def test_the_window_a_crash_after_the_effect_repeats_it(tmp_path: Path) -> None:
    """Documented behaviour: effect done, crash before the mark -> one repeat
    once the lease runs out; atomic_once has no such window."""
    url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    log = tmp_path / "effects.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    p = subprocess.run(
        [sys.executable, "-c", _CRASHER, url, str(fd), "0.5"],
        cwd=ROOT,
        pass_fds=(fd,),
        check=False,
    )
    os.close(fd)
    assert p.returncode == -signal.SIGKILL
    assert log.read_text() == "effect\n"
    with open_store(url, "crash", lease=0.5) as s:
        assert s.state("job") == "claimed"  # the dead runner's claim, until its lease ends
        assert s.run_once("job", lambda: log.open("a").write("effect\n"), wait=5) is True
        assert s.state("job") == "done"
    assert log.read_text() == "effect\neffect\n"  # the window: repeated once
