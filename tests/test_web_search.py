"""Task search (``TaskStore.search`` of the memory and SQLite stores, and the
web layer's fallback for a store without it) give the same answers; the
console's settings (root path, sampling); chart data and SVG."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kew import ConfigError
from kew.task.model import TaskEvent, TaskRecord, WorkerRecord
from kew.task.store import MemoryTaskStore, SqliteTaskStore
from kew.web._svg import depth_chart, task_chart
from kew.web.config import WebConfig, load_config, normalize_root
from kew.web.history import DepthPoint, bucket_ms, task_counts
from kew.web.search import TaskQuery, search_tasks

T0 = 1_700_000_000_000


class RecentOnly:
    """A store of the older shape: ``recent`` but no ``search`` (the web
    layer then filters in Python).  It reads a real store."""

    def __init__(self, inner: MemoryTaskStore) -> None:
        self._inner = inner

    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]:
        return self._inner.recent(limit, queue)

    def workers(self) -> list[WorkerRecord]:
        return self._inner.workers()


def _events() -> list[TaskEvent]:
    """20 tasks over 2 queues: running, succeeded, failed (with errors), queued."""
    out: list[TaskEvent] = []
    for i in range(20):
        tid, q, at = f"t{i:02d}", ("alpha", "beta")[i % 2], T0 + i * 1000
        out.append(TaskEvent(tid, q, "queued", at))
        if i % 4 == 0:
            continue  # stays queued
        out.append(TaskEvent(tid, q, "running", at + 100, attempt=1, worker=f"w{i % 3}"))
        if i % 4 == 1:
            continue  # running
        if i % 4 == 2:
            out.append(TaskEvent(tid, q, "succeeded", at + 500, attempt=1, worker=f"w{i % 3}"))
        else:
            err = "Disk FULL on /data" if i % 8 == 3 else "timeout talking to OMERO"
            out.append(TaskEvent(tid, q, "failed", at + 700, attempt=1, error=err))
    return out


@pytest.fixture(params=["memory", "sqlite", "fallback"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        s: Any = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        s.apply(_events())
        yield s
        s.close()
        return
    mem = MemoryTaskStore()
    mem.apply(_events())
    yield mem if request.param == "memory" else RecentOnly(mem)


QUERIES = [
    TaskQuery(),
    TaskQuery(queues=("alpha",)),
    TaskQuery(queues=("alpha", "beta"), statuses=("failed",)),
    TaskQuery(statuses=("running", "queued")),
    TaskQuery(error="disk full"),  # case-insensitive substring
    TaskQuery(error="%"),  # no wildcard: matches nothing
    TaskQuery(since=T0 + 5000, until=T0 + 10_000),
    TaskQuery(updated_since=T0 + 15_000),
    TaskQuery(worker="w1"),
    TaskQuery(queues=("beta",), limit=3, offset=2),
    TaskQuery(statuses=("failed",), error="omero", queues=("beta",)),
]


def _expected(q: TaskQuery) -> list[str]:
    """The answer from the rule itself over every record, newest first."""
    mem = MemoryTaskStore()
    mem.apply(_events())
    every = mem.recent(limit=1000)
    return [r.id for r in every if q.matches(r)][q.offset : q.offset + q.limit]


@pytest.mark.parametrize("q", QUERIES, ids=lambda q: repr(q)[9:60])
def test_search_gives_the_same_answer_on_every_store(store: Any, q: TaskQuery) -> None:
    got = [r.id for r in search_tasks(store, q)]
    assert got == _expected(q)


def test_search_answers_are_right() -> None:
    mem = MemoryTaskStore()
    mem.apply(_events())
    assert [r.id for r in mem.search(error="DISK")] == ["t19", "t11", "t03"]
    assert {r.status for r in mem.search(statuses=["failed"])} == {"failed"}
    assert [r.id for r in mem.search(since=T0 + 18_000)] == ["t19", "t18"]
    assert [r.id for r in mem.search(until=T0 + 2000)] == ["t01", "t00"]
    page1, page2 = mem.search(limit=5), mem.search(limit=5, offset=5)
    assert len(page1) == len(page2) == 5 and not {r.id for r in page1} & {r.id for r in page2}
    assert mem.search(queues=["nope"]) == []


# -- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("", ""),
        ("/", ""),
        ("/kew", "/kew"),
        ("/kew/", "/kew"),
        ("kew", "/kew"),
        ("/a/b.c", "/a/b.c"),
    ],
)
def test_root_path_is_normalised(given: str, root: str) -> None:
    assert normalize_root(given) == root
    assert WebConfig(root_path=given).root_path == root


@pytest.mark.parametrize("bad", ["/a b", "/kew?x=1", "//kew", "/k#", "/é"])
def test_a_bad_root_path_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="root_path"):
        WebConfig(root_path=bad)


def test_root_path_and_sampling_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "web.toml"
    f.write_text('[web]\nroot_path = "/ops/kew/"\nsample_seconds = 2.5\nhistory_hours = 3\n')
    c = load_config(f, env={})
    assert (c.root_path, c.sample_seconds, c.history_hours) == ("/ops/kew", 2.5, 3.0)
    assert load_config(f, env={"KEW_WEB_ROOT_PATH": "/other"}).root_path == "/other"
    with pytest.raises(ConfigError, match="sample_seconds"):
        WebConfig(sample_seconds=0)


# -- charts -------------------------------------------------------------------------------


def _record(tid: str, queue: str, status: str, started: int | None, finished: int | None) -> Any:
    return TaskRecord(tid, queue, status, 1, T0, T0, started_at=started, finished_at=finished)  # type: ignore[arg-type]


def test_task_counts_per_bucket() -> None:
    minute = 60_000
    records = [
        _record("a", "q1", "succeeded", T0 + 10, T0 + minute + 5),
        _record("b", "q1", "failed", T0 + minute, T0 + 2 * minute),
        _record("c", "q2", "running", T0 + 2 * minute + 1, None),
        _record("d", "q2", "succeeded", T0 - 5, T0 + 1),  # started before the window
        _record("e", "q2", "succeeded", T0 + 10 * minute, T0 + 10 * minute),  # after it
    ]
    counts = task_counts(records, T0, T0 + 3 * minute, minute, ["q1", "q2"])
    rows = {q: [(p.started, p.succeeded, p.failed) for p in pts] for q, pts in counts.items()}
    assert rows["q1"] == [(1, 0, 0), (1, 1, 0), (0, 0, 1)]
    assert rows["q2"] == [(0, 1, 0), (0, 0, 0), (1, 0, 0)]
    assert rows["*"] == [(1, 1, 0), (1, 1, 0), (1, 0, 1)]
    assert [p.at for p in counts["*"]] == [T0, T0 + minute, T0 + 2 * minute]
    assert bucket_ms(60 * minute) == minute
    assert bucket_ms(24 * 60 * minute) == 6 * minute  # at most 240 buckets


def test_charts_are_svg_with_their_data() -> None:
    minute = 60_000
    counts = task_counts(
        [_record("a", "q", "succeeded", T0 + 5, T0 + 6)], T0, T0 + 5 * minute, minute, ["q"]
    )
    html = str(task_chart(counts["q"], T0, T0 + 5 * minute, "q"))
    assert html.startswith('<figure class="chart" data-kind="tasks" data-queue="q"')
    assert 'data-total="2"' in html  # one started, one succeeded
    assert html.count("<polyline") == 3 and "<script" not in html and "http" not in html
    empty = str(depth_chart([], T0, T0 + minute, "q", every=15))
    assert "no samples yet (one every 15 s)" in empty and "<polyline" not in empty
    one = str(depth_chart([DepthPoint(T0, 3, 1, 0, -1)], T0, T0 + minute, "<q>"))
    assert "&lt;q&gt;" in one and "<q>" not in one  # escaped
    assert one.count('class="k-ready dot"') == 1
    assert '<b data-series="dead">?</b>' in one  # a count the provider cannot give


def test_fallback_scans_only_what_recent_gives() -> None:
    mem = MemoryTaskStore()
    mem.apply(_events())
    older = RecentOnly(mem)
    for a, b in itertools.pairwise(search_tasks(older, TaskQuery(statuses=("failed",)))):
        assert (a.created_at, a.id) > (b.created_at, b.id)
