"""What only shared task stores (SQLite, PostgreSQL) promise, each
connection standing for another process or host: concurrent recorders end
where one would, a reader never sees half a batch, a retention pass can run
meanwhile; PostgreSQL's URLs, schema and connection; and an App reading what
another App's worker recorded into PostgreSQL."""

from __future__ import annotations

import importlib.util
import random
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kew.qchan.spi.errors import BrokerUnavailable, ConfigError, ProviderNotFound
from kew.task import App, Intervals, Retry, TaskEvent, TaskStore, current, open_store
from kew.testing.util import free_port, require, wait_for
from tests.task_store_kit import (
    PG,
    Schemas,
    admin,
    batches,
    ev,
    recorders,
    reference,
    snapshot,
    split_lives,
    stream,
    suffix,
)


@pytest.fixture
def schemas() -> Iterator[Schemas]:
    s = Schemas()
    yield s
    s.drop()


@pytest.fixture
def pg_url(schemas: Schemas) -> str:
    return schemas.url()


@pytest.fixture(params=["sqlite", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL that several connections (recorders, readers) open at once."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.sqlite3"
    return str(request.getfixturevalue("pg_url"))


@pytest.mark.parametrize("how", ["same-batches", "both-all", "split", "competing"])
def test_concurrent_recorders_end_where_one_does(shared_url: str, how: str) -> None:
    """Two recorders, each with its own connection, apply events at the same
    time, and the store ends exactly where one recorder applying them all
    once, in order, ends.

    ``same-batches``: both apply the same batches at the same moment;
    ``both-all``: both apply every event, in batches of their own, with
    repeats; ``split``: at the same moment, one applies the first half of
    some tasks' lives and the other the second half (a lost update shows:
    a status, or the first attempt's error, gone); ``competing`` (two recorders
    on one events queue): each event goes to one of them, some to both
    (redeliveries), of the kinds whose outcome does not depend on order."""
    rng = random.Random(11)
    if how == "split":
        events, submits, halves = split_lives(40, 8)
        ids = sorted({e.task_id for e in events})
        plans = [halves[0::2], halves[1::2]]
        setup = open_store(shared_url)
        setup.apply(submits)  # rows to update: no insert to wait on, only locks
        setup.close()
    else:
        events, ids = stream(seed=11, tasks=60, any_order=how == "competing")
    if how == "same-batches":
        plan = batches(events, rng, 24)
        plans = [plan, [list(b) for b in plan]]
    elif how == "both-all":
        plans = [batches(events, rng, 24) for _ in range(2)]
    elif how == "competing":
        shares: list[list[TaskEvent]] = [[], []]
        for e in events:
            for i in rng.choice([[0], [1], [0], [1], [0, 1]]):
                shares[i].append(e)
        plans = [batches(share, rng, 12) for share in shares]
    expected = reference(events, ids)
    recorders(shared_url, plans, lockstep=how in ("same-batches", "split"))
    reader = open_store(shared_url)
    try:
        got = snapshot(reader, ids)
    finally:
        reader.close()
    assert got["records"] == expected["records"]
    assert got["output"] == expected["output"]
    assert got["recent"] == expected["recent"]
    assert got["workers"] == expected["workers"]


def test_pruning_while_recorders_apply(shared_url: str) -> None:
    """A retention pass deleting final tasks while two recorders apply (locks in
    the same order): no deadlock surfaces, and no output is left without its task."""
    events, ids = stream(seed=5, tasks=60)
    rng = random.Random(5)
    plans = [batches(events, rng, 16) for _ in range(2)]
    pruned: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def prune() -> None:
        store = open_store(shared_url)
        try:
            while True:  # while they apply, and once after
                last = done.is_set()
                pruned.append(store.prune(10**15))  # every final task
                if last:
                    break
        except BaseException as e:
            errors.append(e)
        finally:
            store.close()

    pruner = threading.Thread(target=prune)
    pruner.start()
    try:
        recorders(shared_url, plans, lockstep=False)
    finally:
        done.set()
        pruner.join(60)
    assert not errors, errors
    assert sum(pruned) > 0
    reader = open_store(shared_url)
    try:
        for tid in ids:
            text, _ = reader.output(tid)
            assert not text or reader.get(tid) is not None, tid
        reader.prune(10**15)  # what the recorders left final
        assert all(not r.final for r in reader.recent(1000))
    finally:
        reader.close()


def test_a_reader_never_sees_half_a_batch(shared_url: str) -> None:
    """Each batch moves 20 tasks to their next attempt, with two lines of
    output each; a reader on another connection sees all of a batch or none."""
    ids = [f"torn-{i:02d}" for i in range(20)]
    rounds = 60

    def batch(n: int) -> list[TaskEvent]:
        out: list[TaskEvent] = []
        for tid in ids:
            kw: dict[str, Any] = {"attempt": n, "run": 1000 * n, "worker": "w"}
            out += [
                TaskEvent(tid, "q", "running", 1000 * n, **kw),
                TaskEvent(tid, "q", "output", 1000 * n + 1, seq=0, text=f"a{n}\n", **kw),
                TaskEvent(tid, "q", "output", 1000 * n + 2, seq=1, text=f"b{n}\n", **kw),
                TaskEvent(tid, "q", "retry-scheduled", 1000 * n + 3, error=f"E{n}", **kw),
            ]
        return out

    writer, reader = open_store(shared_url), open_store(shared_url)
    done = threading.Event()
    failure: list[BaseException] = []

    reads = [0]

    def more_reads(than: int) -> Callable[[], bool]:
        return lambda: reads[0] > than

    def write() -> None:
        try:
            for n in range(1, rounds + 1):
                if n % 10 == 0:  # let the reader in: a few reads between the batches
                    wait_for(more_reads(reads[0] + 2), 10, what="the reader")
                writer.apply(batch(n))
        except BaseException as e:
            failure.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen_attempts: set[int] = set()
    try:
        while not done.is_set():
            records = reader.recent(100)
            attempts = {r.attempt for r in records}
            assert len(attempts) <= 1, f"half a batch: attempts {attempts}"
            if records:
                assert len(records) == len(ids)
                n = attempts.pop()
                seen_attempts.add(n)
                assert all(r.status == "retry-scheduled" for r in records)
                assert {r.last_error for r in records} == {f"E{n}"}
            r = reader.get(ids[3])
            text, _ = reader.output(ids[3])  # read after the record: has its attempt's lines
            if r is not None:
                assert (r.status, r.last_error) == ("retry-scheduled", f"E{r.attempt}")
                assert f"a{r.attempt}\nb{r.attempt}\n" in text, (r.attempt, text[-40:])
            lines = text.splitlines()
            pairs = [x for x in lines if not x.startswith("---")]
            assert len(pairs) % 2 == 0, f"half a batch of output: {lines[-3:]}"
            reads[0] += 1
    finally:
        thread.join(60)
        writer.close()
    assert not failure, failure
    final = reader.get(ids[0])
    reader.close()
    assert final is not None and final.attempt == rounds
    assert reads[0] > 15 and len(seen_attempts) >= 5, (reads, seen_attempts)


# -- PostgreSQL: URLs, schema, connection ---------------------------------------------------


def test_postgres_urls_and_schema_option() -> None:
    from kew.task._pgstore import parse_url

    assert parse_url(PG) == (PG, "kew")
    assert parse_url(f"{PG}?schema=mine&connect_timeout=3&sslmode=disable") == (
        f"{PG}?connect_timeout=3&sslmode=disable",
        "mine",
    )
    for bad in ("a-b", "1abc", "", "x" * 64, "kew;drop"):
        with pytest.raises(ConfigError, match="schema="):
            parse_url(f"{PG}?schema={bad}")
    with pytest.raises(ConfigError, match="twice"):
        parse_url("postgresql://u:secret@h/db?schema=a&schema=b")
    with pytest.raises(ValueError, match="unknown task store URL"):
        open_store("mysql://x")


def test_postgres_libpq_options_pass_through_and_bad_ones_are_config_errors(
    pg_url: str,
) -> None:
    require(importlib.util.find_spec("psycopg") is not None, "psycopg is not installed")
    with pytest.raises(ConfigError, match="bogus"):
        open_store(f"{pg_url}&bogus=1")
    with pytest.raises(ConfigError, match="IPv6") as info:
        open_store("postgresql://kew:s3cret@[::1/test")
    assert "s3cret" not in str(info.value)
    name = f"kew-test-{suffix()}"
    store = open_store(f"{pg_url}&application_name={name}&connect_timeout=3")
    try:
        with admin() as conn:
            seen = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
        assert seen == (1,)  # the URL's own application_name, not kew's default
    finally:
        store.close()


def test_postgres_store_opens_by_url_and_shares_state(schemas: Schemas) -> None:
    from kew.task._pgstore import PostgresTaskStore

    url = schemas.url()
    a = open_store(url)
    b = open_store(url.replace("postgresql://", "postgres://"))
    other = open_store(schemas.url())  # another schema: another store
    try:
        assert isinstance(a, PostgresTaskStore) and isinstance(b, PostgresTaskStore)
        a.apply([ev("running", 1, 100, 1000, worker="w")])
        r = b.get("t1")
        assert r is not None and (r.status, r.worker) == ("running", "w")
        assert other.get("t1") is None
    finally:
        for s in (a, b, other):
            s.close()
    with pytest.raises(RuntimeError, match="closed"):
        a.get("t1")


def test_postgres_unreachable_is_a_clear_error_without_the_password() -> None:
    require(importlib.util.find_spec("psycopg") is not None, "psycopg is not installed")
    url = f"postgresql://kew:s3cret@127.0.0.1:{free_port()}/test?schema=x"
    with pytest.raises(BrokerUnavailable, match="cannot connect to the task store") as info:
        open_store(url)
    assert "s3cret" not in str(info.value) and "kew:***@" in str(info.value)


def test_postgres_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.delitem(sys.modules, "kew.task._pgstore", raising=False)
    with pytest.raises(ProviderNotFound, match=r"pip install 'ome-kew\[postgres\]'"):
        open_store("postgresql://127.0.0.1/test")


def test_postgres_schema_created_once_by_concurrent_openers(schemas: Schemas) -> None:
    url = schemas.url()
    schema = url.rsplit("=", 1)[1]
    start = threading.Barrier(6)
    stores: list[TaskStore] = []
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            start.wait(10)
            stores.append(open_store(url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(stores) == 6
    stores[0].apply([TaskEvent("x", "q", "queued", 1)])
    assert all(s.get("x") is not None for s in stores)
    for s in stores:
        s.close()
    with admin() as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
            "ORDER BY table_name",
            (schema,),
        ).fetchall()
        assert [t for (t,) in tables] == ["task", "task_output", "task_worker"]
    again = open_store(url)  # an existing schema: opened as it is
    assert again.get("x") is not None
    again.close()


def test_postgres_connection_lost_is_opened_again(pg_url: str) -> None:
    from kew.task._pgstore import PostgresTaskStore

    store = open_store(pg_url)
    assert isinstance(store, PostgresTaskStore)
    store.apply([ev("running", 1, 100, 1000)])
    conn = store._conn
    assert conn is not None
    with admin() as other:
        other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    store.apply([ev("succeeded", 1, 100, 1001)])  # on a new connection
    r = store.get("t1")
    assert r is not None and r.status == "succeeded"
    assert store._conn is not conn
    store.close()


# -- end to end: a worker records into PostgreSQL, another App reads ------------------------


class Job(msgspec.Struct, frozen=True):
    n: int


def test_app_status_from_another_app_sharing_a_postgres_store(pg_url: str, tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path}/q.sqlite3?lease=2"
    events_queue = f"test.events-{suffix()}"
    app = App(broker, store=pg_url, events_queue=events_queue)

    @app.task(retry=Intervals([0.05]))
    def flaky(job: Job) -> None:
        ctx = current()
        ctx.log(f"n={job.n} attempt={ctx.attempt}")
        if ctx.attempt == 1 and job.n % 2:
            raise Retry("once more")

    # a second App (another host: its own connector and store connection) runs a second
    # recorder on the same events queue, and reads
    other = App(broker, store=pg_url, events_queue=events_queue)
    worker = app.worker(concurrency=2, record=True).start()
    recorder = other.recorder()
    try:
        tids = [flaky.submit(Job(n)) for n in range(6)]

        def expected_lines(n: int) -> list[str]:
            if n % 2 == 0:
                return [f"n={n} attempt=1"]
            return [
                f"n={n} attempt=1",
                "[kew] attempt 1 failed: once more",
                "--- attempt 2 ---",
                f"n={n} attempt=2",
            ]

        def all_recorded() -> bool:
            # the two recorders take turns: wait for every event, whichever applied it
            return all(
                (r := other.status(tid)) is not None
                and r.final
                and other.output(tid)[0].splitlines() == expected_lines(n)
                for n, tid in enumerate(tids)
            )

        wait_for(all_recorded, 30, what="every task final, with its output, in the store")
    finally:
        recorder.stop(5)
        worker.stop(5)
    for n, tid in enumerate(tids):
        r = other.status(tid)
        assert r is not None and r.status == "succeeded"
        assert r.attempt == (2 if n % 2 else 1)
        assert r.last_error == ("once more" if n % 2 else "")
        assert app.status(tid) == r  # the worker's App reads the same
        assert app.output(tid) == other.output(tid)
    assert {t.id for t in other.store.recent(10, queue=flaky.name)} == set(tids)
    assert any(w.id == worker.id for w in other.store.workers())
    other.close()
    app.close()
