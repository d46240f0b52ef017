"""The task stores: one suite, run on memory://, SQLite and PostgreSQL (the
machine's, 127.0.0.1:5432, database ``test``; each test in schemas of its own,
dropped after).  What only shared stores promise (several connections at once)
is in tests/test_task_store_shared.py."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kew.qchan.spi import now_ms
from kew.task import MemoryTaskStore, SqliteTaskStore, TaskEvent, TaskStore, open_store
from tests.task_store_kit import Schemas, batches, ev, reference, snapshot, stream, suffix


@pytest.fixture
def schemas() -> Iterator[Schemas]:
    s = Schemas()
    yield s
    s.drop()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], TaskStore]]:
    """Opens a new, empty store of the kind under test (closed at the end)."""
    opened: list[TaskStore] = []

    def make() -> TaskStore:
        if request.param == "memory":
            store: TaskStore = MemoryTaskStore()
        elif request.param == "sqlite":
            store = SqliteTaskStore(tmp_path / f"s{suffix()}.sqlite3")
        else:
            store = open_store(request.getfixturevalue("schemas").url())
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# -- the suite, on every store ------------------------------------------------------------


def test_store_is_idempotent_and_order_tolerant(fresh: Callable[[], TaskStore]) -> None:
    life = [
        TaskEvent("t1", "q", "queued", 900),
        ev("running", 1, 100, 1000),
        ev("output", 1, 100, 1001, text="a1\n"),
        ev("retry-scheduled", 1, 100, 1002, error="E1", next_at=2000),
        ev("running", 2, 200, 2000),
        ev("output", 2, 200, 2001, text="a2\n"),
        ev("output", 2, 200, 2002, seq=1, text="b2\n"),
        ev("succeeded", 2, 200, 2003),
    ]
    expected_text = "a1\n--- attempt 2 ---\na2\nb2\n"
    orders = [life, list(reversed(life)), life[3:] + life[:3], life + life[2:5]]
    for order in orders:
        s = fresh()
        for e in order:  # one by one, and again as one batch: same result
            s.apply([e])
        s.apply(order)
        r = s.get("t1")
        assert r is not None
        assert (r.status, r.attempt, r.created_at, r.finished_at) == ("succeeded", 2, 900, 2003)
        assert r.last_error == "E1"
        assert s.output("t1") == (expected_text, len(expected_text))
    # a rerun of the same attempt (worker died) after a final status reopens it
    s = fresh()
    s.apply(life)
    s.apply([ev("running", 2, 300, 3000), ev("output", 2, 300, 3001, text="again\n")])
    assert s.get("t1").status == "running"  # type: ignore[union-attr]
    assert s.output("t1")[0].endswith(
        "b2\n--- attempt 2 (run again: its last run was interrupted) ---\nagain\n"
    )
    # a handed-back run goes back to queued; a late event of it changes nothing
    s.apply([ev("released", 2, 300, 3002)])
    assert s.get("t1").status == "queued"  # type: ignore[union-attr]
    s.apply([ev("running", 2, 300, 3000)])
    assert s.get("t1").status == "queued"  # type: ignore[union-attr]
    s.apply([ev("running", 2, 400, 4000), ev("failed", 2, 400, 4001, error="E2")])
    r = s.get("t1")
    assert r is not None and (r.status, r.last_error) == ("failed", "E2")
    s.apply([ev("released", 2, 400, 4002)])  # only a running run can be released
    assert s.get("t1").status == "failed"  # type: ignore[union-attr]
    # workers and retention
    s.apply([TaskEvent("", "", "worker", 5000, worker="w1", text="q")])
    assert [(w.id, w.last_seen) for w in s.workers()] == [("w1", 5000)]
    s.apply([TaskEvent("t2", "q", "queued", 4500)])
    assert s.prune(4001) == 0  # finished at 4001: not before
    assert s.prune(4002) == 1
    assert s.get("t1") is None and s.output("t1") == ("", 0)
    assert [r.id for r in s.recent()] == ["t2"]  # not final: kept
    assert s.workers()  # seen at 5000
    assert s.prune(5001) == 0 and s.workers() == []  # not seen since: dropped
    assert [r.id for r in s.recent()] == ["t2"]


def test_unknown_task_and_empty_batch(fresh: Callable[[], TaskStore]) -> None:
    s = fresh()
    s.apply([])
    assert s.get("nope") is None
    assert s.output("nope") == ("", 0)
    assert s.output("nope", 7) == ("", 7)
    assert s.recent() == [] and s.workers() == []
    assert s.prune(now_ms()) == 0


def test_a_release_alone_makes_no_record(fresh: Callable[[], TaskStore]) -> None:
    s = fresh()
    s.apply([TaskEvent("lone", "q", "released", 10, attempt=1, run=5)])
    assert s.get("lone") is None and s.recent() == []
    s.apply([TaskEvent("lone", "q", "running", 20, attempt=1, run=20, worker="w")])
    r = s.get("lone")
    assert r is not None and (r.status, r.worker, r.started_at) == ("running", "w", 20)


def test_output_offsets_order_and_first_chunk_wins(fresh: Callable[[], TaskStore]) -> None:
    s = fresh()
    chunks = [ev("output", 1, 100, 1000 + i, seq=i, text=f"line {i}\n") for i in range(5)]
    s.apply(chunks[3:] + chunks[:3])  # out of order, output before any status
    r = s.get("t1")
    assert r is not None and (r.status, r.attempt) == ("queued", 0)  # a placeholder
    s.apply([ev("output", 1, 100, 2000, seq=2, text="REPLACED\n")])  # a repeat: kept as first
    text = "".join(f"line {i}\n" for i in range(5))
    assert s.output("t1") == (text, len(text))
    assert s.output("t1", 7) == (text[7:], len(text))
    assert s.output("t1", len(text)) == ("", len(text))
    assert s.output("t1", len(text) + 3) == ("", len(text) + 3)


def test_recent_order_limit_and_queue(fresh: Callable[[], TaskStore]) -> None:
    s = fresh()
    s.apply(
        [
            TaskEvent("t-a", "q1", "queued", 100),
            TaskEvent("t-B", "q2", "queued", 100),
            TaskEvent("t-b", "q1", "queued", 100),
            TaskEvent("t-0", "q2", "queued", 50),
            TaskEvent("t-z", "q1", "queued", 200),
        ]
    )
    # newest first; equal times by id, descending, in byte order ("B" < "a" < "b")
    assert [r.id for r in s.recent()] == ["t-z", "t-b", "t-a", "t-B", "t-0"]
    assert [r.id for r in s.recent(2)] == ["t-z", "t-b"]
    assert [r.id for r in s.recent(queue="q2")] == ["t-B", "t-0"]
    assert [r.id for r in s.recent(1, queue="q1")] == ["t-z"]
    assert s.recent(queue="none") == []


def test_worker_heartbeats(fresh: Callable[[], TaskStore]) -> None:
    s = fresh()

    def beat(worker: str, at: int, queues: str) -> TaskEvent:
        return TaskEvent("", "", "worker", at, worker=worker, text=queues)

    s.apply([beat("w2", 10, "a"), beat("w1", 30, "b"), beat("w1", 20, "old")])
    assert [(w.id, w.queues, w.last_seen) for w in s.workers()] == [
        ("w1", "b", 30),
        ("w2", "a", 10),
    ]
    s.apply([beat("w1", 25, "older")])  # an older heartbeat, late: changes nothing
    s.apply([beat("w2", 10, "same time, later")])  # the same time: the later one wins
    assert [(w.id, w.queues, w.last_seen) for w in s.workers()] == [
        ("w1", "b", 30),
        ("w2", "same time, later", 10),
    ]


def test_nul_characters_do_not_stop_a_batch(fresh: Callable[[], TaskStore]) -> None:
    """A NUL in output or an error (a command's binary output) is stored: as is
    on SQLite and in memory, as U+FFFD on PostgreSQL, which cannot hold one."""
    s = fresh()
    s.apply(
        [
            ev("output", 1, 100, 1000, text="a\x00b\n"),
            ev("failed", 1, 100, 1001, error="bad \x00 byte", worker="w\x00"),
        ]
    )
    text, _ = s.output("t1")
    r = s.get("t1")
    assert r is not None and r.status == "failed"
    assert text.replace("\ufffd", "\x00") == "a\x00b\n"
    assert r.last_error.replace("\ufffd", "\x00") == "bad \x00 byte"


def test_search_filters(fresh: Callable[[], TaskStore]) -> None:
    """Every filter of ``search`` alone and together, with paging, as the memory
    store answers them (the reference: plain Python)."""
    events: list[TaskEvent] = []
    for i in range(24):
        tid, q, t = f"s{i:02d}", f"q{i % 3}", 1000 * i
        events.append(TaskEvent(tid, q, "queued", t))
        kw: dict[str, Any] = {"attempt": 1, "run": t + 1, "worker": f"w{i % 4}"}
        if i % 5 == 0:
            continue  # still queued
        events.append(TaskEvent(tid, q, "running", t + 1, **kw))
        if i % 4 == 1:
            error = "Disk FULL on /data" if i % 3 else "timeout"
            events.append(TaskEvent(tid, q, "failed", t + 500, error=error, **kw))
        elif i % 4 == 2:
            events.append(TaskEvent(tid, q, "succeeded", t + 500, **kw))
    s, ref = fresh(), MemoryTaskStore()
    s.apply(events)
    ref.apply(events)
    queries: list[dict[str, Any]] = [
        {},
        {"queues": ["q1"]},
        {"queues": ["q0", "q2"], "statuses": ["running", "queued"]},
        {"statuses": ["failed"]},
        {"since": 5000, "until": 15000},
        {"updated_since": 12_000},
        {"error": "disk full"},
        {"error": "%"},
        {"worker": "w2", "statuses": []},
        {"limit": 5},
        {"limit": 5, "offset": 5},
        {"queues": ["nope"]},
    ]
    for query in queries:
        want = [r.id for r in ref.search(**query)]
        assert [r.id for r in s.search(**query)] == want, query
    assert [r.id for r in s.search(error="disk full")] == ["s17", "s13", "s01"]
    assert s.search(limit=100) == s.recent(100)


def test_batches_and_repeats_end_where_one_at_a_time_does(
    fresh: Callable[[], TaskStore],
) -> None:
    events, ids = stream(seed=7, tasks=30)
    expected = reference(events, ids)
    assert {r.status for r in expected["records"].values()} >= {"succeeded", "failed", "queued"}
    assert any("run again" in text for text, _ in expected["output"].values())
    s = fresh()
    for batch in batches(events, random.Random(1), 40):
        s.apply(batch)
    assert snapshot(s, ids) == expected
