"""OMERO import example: batch bookkeeping is idempotent under redelivery
(outcomes recorded with kew.idempotency's atomic_once, the report sent
through its once), on memory, SQLite and the machine's Redis; and the
outcome e-mails say what happened."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kew
from examples.omero_import.batches import BatchStore, TaskOutcome, outcome_key, report_key
from examples.omero_import.report import admin_letter, experimenter_letters
from kew.idempotency import StillClaimed
from kew.qchan.spi import ConfigError
from kew.qchan.spi.dedupe import ClaimResult
from kew.testing.util import port_open, require


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    tag = os.urandom(4).hex()
    if request.param == "memory":
        yield f"memory://omero-{tag}"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kew.sqlite3'}"
    else:
        require(port_open("127.0.0.1", 6379), "no Redis at 127.0.0.1:6379")
        prefix = f"omero-b-{tag}"
        yield f"redis://127.0.0.1:6379/15?prefix={prefix}"
        conn: Any = kew.connect(f"redis://127.0.0.1:6379/15?prefix={prefix}")
        for k in conn.redis.scan_iter(f"{prefix}:*"):  # leave the shared Redis as it was
            conn.redis.delete(k)
        conn.close()


@pytest.fixture
def store(url: str) -> Iterator[BatchStore]:
    s = BatchStore.open(url)
    yield s
    s.close()


def _record(store: BatchStore, task: str, status: str = "succeeded", size: int = 3) -> bool:
    return store.record(
        "b1",
        size,
        task,
        target=f"/data/{task}.tif",
        email="ann@lab.example",
        status=status,
        error="" if status == "succeeded" else "exit status 1",
        attempt=1,
    )


def test_redelivered_outcomes_count_once(store: BatchStore) -> None:
    assert not _record(store, "t1")
    assert not _record(store, "t1")  # redelivered: still one of three
    assert not _record(store, "t2", "failed")
    assert not store.is_complete("b1")
    assert _record(store, "t3")  # the third distinct task completes it
    assert store.is_complete("b1")
    assert [o.task_id for o in store.outcomes("b1")] == ["t1", "t2", "t3"]
    assert store.outcomes("b1")[1].status == "failed"
    # each outcome is a done key of the idempotency store
    assert store.idempotency.is_done(outcome_key("b1", "t2"))
    assert not store.idempotency.is_done(outcome_key("b1", "t4"))
    # exactly one report: a second reporter finds it done and sends nothing
    sent: list[list[TaskOutcome]] = []
    assert store.report("b1", sent.append)
    assert store.report("b1", sent.append)
    assert [[o.task_id for o in batch] for batch in sent] == [["t1", "t2", "t3"]]
    assert store.is_reported("b1") and store.idempotency.is_done(report_key("b1"))
    assert not _record(store, "t3")  # a redelivery after the report does nothing
    assert not store.is_reported("b2")


def test_a_redelivered_outcome_keeps_the_first_record(store: BatchStore) -> None:
    _record(store, "t1", "failed", size=1)
    store.record("b1", 1, "t1", target="/other", email="x@y.z", status="succeeded")
    (o,) = store.outcomes("b1")
    assert (o.status, o.target, o.error) == ("failed", "/data/t1.tif", "exit status 1")


def test_a_dead_reporters_claim_runs_out(url: str) -> None:
    store = BatchStore.open(url, lease=0.3)
    try:
        for t in ("t1", "t2", "t3"):
            _record(store, t)
        # a reporter claimed the report, then its process died: nobody renews its lease
        dead = store.idempotency.backend.claim(report_key("b1"), "dead-worker", 300)
        assert dead is ClaimResult.CLAIMED
        sent: list[str] = []
        assert not store.report("b1", lambda _: sent.append("early"))  # still claimed
        assert sent == [] and store.idempotency.state(report_key("b1")) == "claimed"
        with pytest.raises(StillClaimed), store.idempotency.once(report_key("b1"), wait=0):
            pass
        # once the claim has run out, the next one takes over; sending fails: given back
        with (
            pytest.raises(RuntimeError, match="mail queue down"),
            store.idempotency.once(report_key("b1"), wait=5) as first,
        ):
            assert first
            raise RuntimeError("mail queue down")
        assert store.idempotency.state(report_key("b1")) is None and not store.is_reported("b1")
        assert store.report("b1", lambda _: sent.append("sent"))
        assert sent == ["sent"] and store.is_reported("b1")
    finally:
        store.close()


def test_concurrent_recorders_complete_once(url: str) -> None:
    """Two stores on one backend (two workers) racing over the same outcomes."""
    stores = [BatchStore.open(url), BatchStore.open(url)]
    wins: list[str] = []
    lock = threading.Lock()

    def run(store: BatchStore) -> None:
        for i in range(40):
            for _ in range(2):  # every outcome delivered twice
                if store.record("big", 40, f"t{i}", target="x", email="a@b.c", status="succeeded"):

                    def send(outcomes: list[TaskOutcome], i: int = i) -> None:
                        with lock:
                            wins.append(f"t{i}:{len(outcomes)}")

                    store.report("big", send)

    try:
        threads = [threading.Thread(target=run, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and wins[0].endswith(":40")
        assert len(stores[0].outcomes("big")) == 40
        assert stores[1].is_reported("big")
    finally:
        for s in stores:
            s.close()


def test_sqlite_outcomes_commit_with_their_done_mark(tmp_path: Path) -> None:
    """On SQLite the outcome row is written in the transaction of its done
    mark, in the broker's own file: both or neither."""
    path = tmp_path / "kew.sqlite3"
    store = BatchStore.open(f"sqlite:///{path}")
    try:
        assert not _record(store, "t1")
        with pytest.raises(ZeroDivisionError):  # an effect that fails after its insert
            store.idempotency.atomic_once(
                outcome_key("b1", "t2"),
                lambda db: (
                    db.execute(
                        "INSERT INTO omero_batch_outcome VALUES "
                        "('b1', 't2', 3, 'x', 'a@b.c', 'succeeded', '', 1, 0)"
                    ),
                    1 / 0,
                ),
            )
        assert store.idempotency.state(outcome_key("b1", "t2")) is None
        assert [o.task_id for o in store.outcomes("b1")] == ["t1"]
        db = sqlite3.connect(path)
        try:
            rows = db.execute("SELECT batch_id, task_id FROM omero_batch_outcome").fetchall()
            (marks,) = db.execute(
                "SELECT count(*) FROM kew_once WHERE namespace = 'omero-import' AND done = 1"
            ).fetchone()
        finally:
            db.close()
        assert rows == [("b1", "t1")] and marks == 1
    finally:
        store.close()


def test_a_broker_without_a_dedupe_store_is_refused() -> None:
    """RabbitMQ keeps no idempotency records: a clear error asks for a store URL."""
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    conn = kew.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        with pytest.raises(ConfigError, match=r"keeps no idempotency records.*\[batches\] store"):
            BatchStore.open(conn)
    finally:
        conn.close()
    with pytest.raises(ConfigError, match="keeps no idempotency records"):
        BatchStore.open("amqp://guest:guest@127.0.0.1:5672/")  # the connector it made is closed


def test_letters(tmp_path: Path) -> None:
    store = BatchStore.open(f"sqlite:///{tmp_path / 'b.sqlite3'}")
    _record(store, "t1")
    _record(store, "t2", "failed")
    store.record(
        "b1", 3, "t3", target="/data/other.tif", email="bob@lab.example", status="succeeded"
    )
    outcomes = store.outcomes("b1")
    letters = experimenter_letters("b1", outcomes, status_url="http://h/ome/import/{task_id}")
    assert [x.to for x in letters] == ["ann@lab.example", "bob@lab.example"]
    ann, bob = letters
    assert "1 imported, 1 failed" in ann.subject
    assert "/data/t1.tif" in ann.body and "/data/t2.tif" in ann.body
    assert "exit status 1" in ann.body and "http://h/ome/import/t2" in ann.body
    assert "/data/t1.tif" not in bob.body and "1 of 1 imported" in bob.subject
    admin = admin_letter("b1", outcomes, "admin@lab.example")
    assert admin is not None and admin.to == "admin@lab.example"
    assert "/data/t2.tif" in admin.body and "/data/t1.tif" not in admin.body
    assert "ann@lab.example" in admin.body
    ok = [o for o in outcomes if o.status == "succeeded"]
    assert admin_letter("b1", ok, "admin@lab.example") is None
    store.close()
