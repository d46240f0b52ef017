"""OMERO import example: batch bookkeeping is idempotent under redelivery,
and the outcome e-mails say what happened."""

from __future__ import annotations

import threading
from pathlib import Path

from examples.omero_import.batches import BatchStore
from examples.omero_import.report import admin_letter, experimenter_letters


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


def test_redelivered_outcomes_count_once(tmp_path: Path) -> None:
    store = BatchStore(str(tmp_path / "b.sqlite3"))
    assert not _record(store, "t1")
    assert not _record(store, "t1")  # redelivered: still one of three
    assert not _record(store, "t2", "failed")
    assert not store.is_complete("b1")
    assert _record(store, "t3")  # the third distinct task completes it
    assert store.is_complete("b1")
    assert [o.task_id for o in store.outcomes("b1")] == ["t1", "t2", "t3"]
    assert store.outcomes("b1")[1].status == "failed"
    # exactly one reporter wins the claim; a redelivery after the report does nothing
    assert store.claim_report("b1")
    assert not store.claim_report("b1")
    store.mark_reported("b1")
    assert not _record(store, "t3")
    assert not store.claim_report("b1")
    store.close()


def test_a_dead_reporters_claim_runs_out(tmp_path: Path) -> None:
    store = BatchStore(str(tmp_path / "b.sqlite3"))
    for t in ("t1", "t2", "t3"):
        _record(store, t)
    assert store.claim_report("b1", lease_s=0.0)  # claimed, then its process "died"
    assert store.claim_report("b1")  # the next one takes over
    store.release_claim("b1")  # sending failed: give it back
    assert store.claim_report("b1")
    store.close()


def test_concurrent_recorders_complete_once(tmp_path: Path) -> None:
    """Two stores on one file (two workers) racing over the same outcomes."""
    path = str(tmp_path / "b.sqlite3")
    stores = [BatchStore(path), BatchStore(path)]
    wins: list[str] = []
    lock = threading.Lock()

    def run(store: BatchStore) -> None:
        for i in range(40):
            for _ in range(2):  # every outcome delivered twice
                if store.record(
                    "big", 40, f"t{i}", target="x", email="a@b.c", status="succeeded"
                ) and store.claim_report("big"):
                    with lock:
                        wins.append(f"t{i}")

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert len(stores[0].outcomes("big")) == 40
    for s in stores:
        s.close()


def test_letters(tmp_path: Path) -> None:
    store = BatchStore(str(tmp_path / "b.sqlite3"))
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
