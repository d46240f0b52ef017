"""Cancelling a task (docs/tasks.md, "Cancel"), against real brokers: SQLite,
the machine's Redis, RabbitMQ and RabbitMQ's STOMP plugin.

In one process: a queued task never runs and ends ``cancelled``; a running
handler that checks ``current().cancelled`` and a command task running
``sleep 60`` stop within a few seconds and end ``cancelled`` with their
output kept; a finished task is left alone (the answer says so);
cancelling twice is cancelling once; the cancel reaches a worker as a
message (the worker does not read the store); a worker started after the
cancel reads the store's marks and does not run the task, and one that
cannot read them runs it (the known limit).  The stores (memory, SQLite,
PostgreSQL) keep the cancel marks, also in files and schemas made before.
Across processes: a ``kew worker`` process runs the task and ``kew task
cancel ID`` stops it.  Over HTTP (a ``kew serve`` process): the endpoint
needs an admin token, and a cookie request without the CSRF value is
refused.  The page's button: tests/test_web_cancel_page.py.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import kew
from kew.task import (
    App,
    CancelResult,
    MemoryTaskStore,
    NoRetry,
    SqliteTaskStore,
    TaskEvent,
    TaskRecord,
    TaskStore,
    current,
    open_store,
)
from kew.task._cancel import CancelSet, control_queue_name
from kew.task.model import EventKind
from kew.testing.util import port_open, require, wait_for
from tests.apps.cancel_server import CancelServer, login
from tests.brokers.stomp_server import require_rabbitmq_stomp
from tests.task_apps import final
from tests.task_store_kit import Schemas, suffix

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
REDIS = "redis://127.0.0.1:6379/0?lease=2"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
STOMP = "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq"
#: Seconds a running task may take to stop once cancelled.
STOPS_WITHIN = 5.0


class Job(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture(params=["sqlite", "redis", "rabbitmq", "stomp"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/q.sqlite3?lease=2"
    if request.param == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        return REDIS
    if request.param == "rabbitmq":
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
        return RABBITMQ
    require_rabbitmq_stomp()  # RabbitMQ answers on 61613, not another STOMP server
    return STOMP


@pytest.fixture
def app(url: str, tmp_path: Path) -> Iterator[App]:
    a = App(
        url,
        name=f"cancel-{suffix()}",
        store=SqliteTaskStore(tmp_path / "tasks.sqlite3"),
        events_queue=f"test.events-{suffix()}",
    )
    yield a
    names = a.queue_names()
    a.close()
    if not url.startswith("sqlite"):
        c = kew.connect(url)
        for name in names:
            c.delete(name)
        c.close()


class Seen:
    """What handlers did: the tasks each ran, by job number."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: list[int] = []
        self.gate = threading.Event()

    def note(self, n: int) -> None:
        with self.lock:
            self.ran.append(n)

    def until_cancelled(self, job: Job) -> None:
        """Logs a tick every 50 ms until the task is cancelled (at most 60 s)."""
        self.note(job.n)
        ctx = current()
        ctx.log(f"job {job.n} started")
        deadline = time.monotonic() + 60
        while not ctx.cancelled.is_set() and time.monotonic() < deadline:
            ctx.log(f"job {job.n} tick")
            ctx.cancelled.wait(0.05)
        ctx.log(f"job {job.n} saw the cancel" if ctx.cancelled.is_set() else "job timed out")

    def gated(self, job: Job) -> None:
        """Waits for the gate, then returns."""
        self.note(job.n)
        current().log(f"job {job.n} ran")
        self.gate.wait(60)


def status(app: App, tid: str) -> str:
    r = app.status(tid)
    return r.status if r is not None else ""


def live(app: App, worker_id: str) -> None:
    """Wait until the store has the worker's heartbeat (so a cancel is sent to it)."""
    wait_for(
        lambda: any(w.id == worker_id for w in app.store.workers()),
        20,
        what=f"the heartbeat of {worker_id}",
    )


def running(app: App, tid: str, text: str) -> None:
    wait_for(
        lambda: status(app, tid) == "running" and text in app.output(tid)[0],
        30,
        what=f"task {tid} running and {text!r} in its output",
    )


def settled(app: App, name: str) -> None:
    """Nothing of queue ``name`` is left: acked (not a dead letter)."""

    def empty() -> bool:
        s = app.queues[name].queue.browser().stats()
        return s.ready <= 0 and s.in_flight <= 0 and s.dead <= 0

    wait_for(empty, 20, what=f"queue {name} empty, no dead letter")


# -- in one process, on every broker ----------------------------------------------


def test_a_queued_task_never_runs_and_ends_cancelled(app: App) -> None:
    seen = Seen()
    name = f"t.gated-{suffix()}"
    tq = app.task_queue(name, Job, seen.gated, retry=NoRetry())
    w = app.worker(concurrency=1, record=True).start()
    try:
        live(app, w.id)
        first = tq.submit(Job(1))  # holds the only handler thread
        wait_for(lambda: seen.ran == [1], 20, what="job 1 to start")
        queued = tq.submit(Job(2))  # waits on the broker behind it
        wait_for(lambda: status(app, queued) == "queued", 20, what="job 2 recorded as queued")
        result = app.cancel(queued, by="the test")
        assert result.cancelled and result.status == "queued", result
        assert result.workers == 1
        rec = app.status(queued)
        assert rec is not None and rec.cancel_requested_at is not None  # marked at once
        # the worker has the message (a task it took before would run: see the docs)
        wait_for(lambda: queued in app.cancels, 10, what="the cancel at the worker")
        seen.gate.set()
        assert final(app, first).status == "succeeded"
        rec = final(app, queued)
        assert rec.status == "cancelled"
        assert seen.ran == [1]  # job 2's handler never ran
        text = app.output(queued)[0]
        assert "job 2" not in text
        assert "[kew] cancelled before attempt 1 started: not run" in text
        settled(app, name)
    finally:
        seen.gate.set()
        w.stop()


def test_a_running_handler_stops_by_message_and_keeps_its_output(app: App) -> None:
    seen = Seen()
    tq = app.task_queue(f"t.loop-{suffix()}", Job, seen.until_cancelled, retry=NoRetry())
    # the worker never reads the store's marks: the cancel can only come as a message
    w = app.worker(concurrency=2, record=True)
    w.poll_cancels = False
    w.start()
    try:
        live(app, w.id)
        tid = tq.submit(Job(7))
        running(app, tid, "job 7 tick")
        asked = time.monotonic()
        result = app.cancel(tid)
        assert (result.cancelled, result.status, result.workers) == (True, "running", 1)
        rec = final(app, tid, timeout=STOPS_WITHIN + 10)
        took = time.monotonic() - asked
        assert rec.status == "cancelled" and took < STOPS_WITHIN, (rec, took)
        assert rec.attempt == 1 and rec.finished_at is not None
        text = app.output(tid)[0]
        assert text.startswith("job 7 started\njob 7 tick\n")  # the output is kept
        assert "job 7 saw the cancel\n[kew] attempt 1 cancelled on request\n" in text
        assert seen.ran == [7]  # run once: not retried
        settled(app, tq.name)
    finally:
        w.stop()


def gone(pid: int) -> bool:
    """No such process, or a zombie (killed, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def sleep_60(job: Job) -> list[str]:
    return ["sh", "-c", f"echo job {job.n} sleeping as $$; exec sleep 60"]


def test_a_running_command_is_killed_and_keeps_its_output(app: App) -> None:
    tq = app.command_task(f"t.sleep-{suffix()}", Job, sleep_60, retry=NoRetry())
    w = app.worker(concurrency=1, record=True).start()
    try:
        live(app, w.id)
        tid = tq.submit(Job(3))
        running(app, tid, "sleeping as")
        m = re.search(r"sleeping as (\d+)", app.output(tid)[0])
        assert m is not None
        pid = int(m.group(1))
        assert not gone(pid)
        asked = time.monotonic()
        assert app.cancel(tid).cancelled
        rec = final(app, tid, timeout=STOPS_WITHIN + 10)
        took = time.monotonic() - asked
        assert rec.status == "cancelled" and took < STOPS_WITHIN, (rec, took)
        assert gone(pid)  # sleep 60 was killed with its process group
        text = app.output(tid)[0]
        assert f"job 3 sleeping as {pid}\n" in text
        assert "[kew] sh: the task was cancelled; its process group was killed" in text
        assert text.endswith("[kew] attempt 1 cancelled on request\n") and "failed" not in text
        assert rec.last_error == ""  # not a failure
        settled(app, tq.name)
    finally:
        w.stop()


def test_cancelling_a_finished_task_changes_nothing(app: App) -> None:
    seen = Seen()
    seen.gate.set()
    tq = app.task_queue(f"t.done-{suffix()}", Job, seen.gated, retry=NoRetry())
    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = tq.submit(Job(4))
        before = final(app, tid)
        assert before.status == "succeeded"
        result = app.cancel(tid)
        assert result == CancelResult(
            tid, False, "succeeded", f"task {tid} succeeded already: nothing to cancel"
        )
        assert app.status(tid) == before  # not even marked
        with pytest.raises(KeyError):
            app.cancel("no-such-task")
    finally:
        w.stop()


def test_cancelling_twice_is_cancelling_once(app: App) -> None:
    seen = Seen()
    tq = app.task_queue(f"t.twice-{suffix()}", Job, seen.until_cancelled, retry=NoRetry())
    w = app.worker(concurrency=1, record=True).start()
    try:
        live(app, w.id)
        tid = tq.submit(Job(5))
        running(app, tid, "job 5 tick")
        results: list[CancelResult] = []
        threads = [threading.Thread(target=lambda: results.append(app.cancel(tid))) for _ in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 2 and all(r.cancelled for r in results), results
        first_mark = app.status(tid)
        assert first_mark is not None and first_mark.cancel_requested_at is not None
        rec = final(app, tid)
        assert rec.status == "cancelled"
        assert rec.cancel_requested_at == first_mark.cancel_requested_at  # the first ask kept
        again = app.cancel(tid)
        assert again == CancelResult(tid, True, "cancelled", f"task {tid} is cancelled already")
        text = app.output(tid)[0]
        assert text.count("cancelled on request") == 1
        assert text.count("job 5 started") == 1 and seen.ran == [5]
        assert app.status(tid) == rec
    finally:
        w.stop()


def test_a_worker_started_after_the_cancel_reads_the_marks(app: App) -> None:
    seen = Seen()
    seen.gate.set()
    name = f"t.late-{suffix()}"
    tq = app.task_queue(name, Job, seen.gated, retry=NoRetry())
    tid = tq.submit(Job(6))
    recorder = app.recorder()  # no worker yet: the submit is recorded, no worker is live
    try:
        wait_for(lambda: status(app, tid) == "queued", 20, what="the task recorded")
        result = app.cancel(tid)
        assert (result.cancelled, result.workers) == (True, 0)  # no worker to tell
    finally:
        recorder.stop(5)
    w = app.worker(concurrency=1, record=True).start()  # reads the store's marks first
    try:
        assert final(app, tid).status == "cancelled"
        assert seen.ran == []
        settled(app, name)
    finally:
        w.stop()


def test_known_limit_a_late_worker_that_cannot_read_the_marks_runs_the_task(app: App) -> None:
    """A worker that started after the cancel was sent and does not read the
    store where it was marked never hears of it (docs/tasks.md, "Cancel")."""
    seen = Seen()
    seen.gate.set()
    tq = app.task_queue(f"t.limit-{suffix()}", Job, seen.gated, retry=NoRetry())
    tid = tq.submit(Job(8))
    app.store.apply([TaskEvent(tid, tq.name, "queued", 1)])
    assert app.cancel(tid).workers == 0
    w = app.worker(concurrency=1, record=True)
    w.poll_cancels = False
    w.start()
    try:
        assert final(app, tid).status == "succeeded"
        assert seen.ran == [8]
    finally:
        w.stop()


def test_a_graceful_stop_deletes_the_control_queue(app: App, url: str) -> None:
    w = app.worker(concurrency=1, record=True).start()
    name = control_queue_name(app.name, w.id)
    assert name.startswith(f"{app.name}.control.") and ":" not in name
    assert w._controls is not None and w._controls.queue.name == name
    live(app, w.id)
    w.stop()
    c = kew.connect(url)
    try:
        if url.startswith("amqp"):  # gone: a publish to it is refused
            with pytest.raises(Exception, match=re.escape(name)):
                c.producer(name).send(kew.Queue(c, name, str).message("x"))
        elif url.startswith("sqlite"):
            with closing(sqlite3.connect(url.split("///", 1)[1].split("?")[0])) as db:
                rows = db.execute("SELECT count(*) FROM kew_queue WHERE name = ?", (name,))
                assert rows.fetchone() == (0,)
        else:  # Redis deletes its stream; STOMP cannot delete a queue, only drain it
            assert c.browser(name).stats().ready <= 0
    finally:
        c.close()


# -- the parts ----------------------------------------------------------------------


def test_cancel_set_forgets_after_its_ttl_and_keeps_at_most_its_size() -> None:
    s = CancelSet(ttl=0.2, most=3)
    assert s.add(["a", "b"]) == ["a", "b"]
    assert s.add(["b", "c"]) == ["c"]
    assert "a" in s and "c" in s and "z" not in s
    s.add(["d"])
    assert "a" not in s and len(s) == 3  # the oldest went first
    wait_for(lambda: "d" not in s, 5, what="the ids forgotten")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    if request.param == "memory":
        s: TaskStore = MemoryTaskStore()
    elif request.param == "sqlite":
        s = SqliteTaskStore(tmp_path / "s.sqlite3")
    else:
        schemas = Schemas()
        request.addfinalizer(schemas.drop)
        s = open_store(schemas.url())
    yield s
    s.close()


def test_stores_keep_cancel_marks_and_the_cancelled_status(store: TaskStore) -> None:
    def e(tid: str, kind: EventKind, at: int, **kw: Any) -> TaskEvent:
        return TaskEvent(tid, "q", kind, at, **kw)

    store.apply(
        [
            e("a", "queued", 100),
            e("b", "queued", 100),
            e("b", "running", 110, attempt=1, run=110, worker="w"),
            e("c", "queued", 100),
            e("c", "succeeded", 120, attempt=1, run=115),
        ]
    )
    store.apply([e(t, "cancel-requested", 200, text="ops") for t in "abc"])
    store.apply([e("a", "cancel-requested", 300), e("x", "cancel-requested", 250)])
    a = store.get("a")
    assert a is not None and (a.status, a.cancel_requested_at) == ("queued", 200)  # first kept
    b = store.get("b")
    assert b is not None and (b.status, b.cancel_requested_at) == ("running", 200)
    x = store.get("x")  # a mark before the task's first event: a placeholder, as output makes
    assert x is not None and (x.status, x.cancel_requested_at) == ("queued", 250)
    assert store.cancel_marks(0) == ["a", "b", "x"]  # not "c": it ended
    assert store.cancel_marks(201) == ["x"] and store.cancel_marks(0, limit=1) == ["a"]
    store.apply(
        [
            e("b", "output", 210, attempt=1, run=110, text="kept\n"),
            e("b", "cancelled", 220, attempt=1, run=110, worker="w"),
            e("b", "running", 215, attempt=1, run=110, worker="w"),  # late: ignored
            e("a", "cancelled", 230, attempt=1, run=230, worker="w"),
        ]
    )
    b = store.get("b")
    assert b is not None and (b.status, b.finished_at, b.started_at) == ("cancelled", 220, 110)
    assert b.final and store.output("b")[0] == "kept\n"
    assert store.cancel_marks(0) == ["x"]
    assert [r.id for r in store.search(statuses=["cancelled"])] == ["b", "a"]
    assert store.prune(10_000) == 3  # cancelled tasks are final: pruned like the others


def test_an_sqlite_store_made_before_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE kew_task (id TEXT PRIMARY KEY, queue TEXT NOT NULL, status TEXT NOT NULL,
        attempt INTEGER NOT NULL, run INTEGER NOT NULL, rank INTEGER NOT NULL,
        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, started_at INTEGER,
        finished_at INTEGER, next_at INTEGER, last_error TEXT NOT NULL DEFAULT '',
        worker TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
        INSERT INTO kew_task VALUES ('old', 'q', 'queued', 0, 0, 0, 5, 5, NULL, NULL, NULL, '', '');
        """
    )
    db.close()
    s = SqliteTaskStore(path)
    try:
        assert s.get("old") == TaskRecord("old", "q", "queued", 0, 5, 5)
        s.apply([TaskEvent("old", "q", "cancel-requested", 9)])
        assert s.cancel_marks(0) == ["old"]
    finally:
        s.close()


def test_a_postgres_schema_made_before_gets_the_column() -> None:
    schemas = Schemas()
    url = schemas.url()
    try:
        open_store(url).close()  # made now: then remove the column, as before it existed
        import psycopg

        schema = url.rsplit("schema=", 1)[1]
        with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{schema}".task DROP COLUMN cancel_requested_at')
        s = open_store(url)
        try:
            s.apply([TaskEvent("t", "q", "queued", 1), TaskEvent("t", "q", "cancel-requested", 2)])
            assert s.cancel_marks(0) == ["t"]
        finally:
            s.close()
    finally:
        schemas.drop()


# -- across processes: kew worker, kew task cancel -----------------------------------


def kew_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kew.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli_env(url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    sfx = f"-{suffix()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "CANCEL_APP_DIR": str(tmp_path),
            "CANCEL_APP_URL": url,
            "CANCEL_APP_SUFFIX": sfx,
        }
    )
    yield env
    if not url.startswith("sqlite"):
        c = kew.connect(url)
        for name in (f"cancel.loop{sfx}", f"cancel.sleep{sfx}", f"cancel.events{sfx}"):
            c.delete(name)
        c.close()


def test_across_processes_kew_task_cancel_stops_a_kew_worker(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    app_ref = "tests/apps/cancel_app.py:app"
    sfx = cli_env["CANCEL_APP_SUFFIX"]
    store_url = f"sqlite:///{tmp_path / 'tasks.sqlite3'}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "kew.cli", "worker", app_ref, "--record", "--concurrency", "2"],
        cwd=ROOT,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("wb"),
    )
    try:
        store = open_store(store_url)
        try:
            wait_for(lambda: store.workers(), 60, what="the worker's heartbeat")
            sent = kew_cli("send", "--app", app_ref, f"cancel.loop{sfx}", '"far"', env=cli_env)
            assert sent.returncode == 0, sent.stderr
            tid = sent.stdout.strip()

            def shown(what: str) -> Callable[[], bool]:
                return lambda: what in store.output(tid)[0]

            wait_for(shown("far: tick"), 60, what="the task running in the worker")
            asked = time.monotonic()
            r = kew_cli("task", "cancel", tid, "--app", app_ref, env=cli_env)
            assert r.returncode == 0, r.stderr
            assert f"cancel of task {tid} (running) asked" in r.stdout + r.stderr

            def cancelled() -> bool:
                rec = store.get(tid)
                return rec is not None and rec.status == "cancelled"

            wait_for(cancelled, STOPS_WITHIN + 10, what="the task cancelled")
            assert time.monotonic() - asked < STOPS_WITHIN + 3  # (the CLI starts a Python)
            text = store.output(tid)[0]
            assert "far: started\nfar: tick\n" in text and "far: stopped\n" in text
            assert "[kew] attempt 1 cancelled on request" in text

            again = kew_cli("task", "cancel", tid, "--app", app_ref, env=cli_env)
            assert again.returncode == 0 and "cancelled already" in again.stdout + again.stderr
            unknown = kew_cli("task", "cancel", "nosuchtask", "--app", app_ref, env=cli_env)
            assert unknown.returncode != 0 and "nosuchtask" in unknown.stderr
        finally:
            store.close()
        assert worker.poll() is None  # the worker goes on
    finally:
        worker.terminate()
        worker.wait(30)


# -- over HTTP: kew serve -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CancelServer]:
    s = CancelServer(tmp_path_factory.mktemp("cancelweb")).start()
    try:
        yield s
    finally:
        s.stop()


def _final(c: httpx.Client, tid: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = c.get(f"/tasks/{tid}").json()
        return doc if doc["status"] in ("succeeded", "failed", "cancelled") else None

    found = wait_for(done, timeout, what=f"task {tid} to end")
    assert found is not None
    return found


def _running(c: httpx.Client, tid: str, text: str) -> None:
    wait_for(
        lambda: text in c.get(f"/tasks/{tid}/output", params={"follow": "false"}).text,
        30,
        what=f"{text!r} in the output of {tid}",
    )


def test_rest_cancel_needs_an_admin_token(server: CancelServer) -> None:
    with (
        closing(server.client(server.admin)) as admin,
        closing(server.client(server.read)) as reader,
        closing(server.client()) as nobody,
    ):
        tid = admin.post("/queues/cancel.loop/tasks", json="rest").json()["id"]
        _running(admin, tid, "rest: tick")
        assert nobody.post(f"/tasks/{tid}/cancel").status_code == 401
        assert reader.post(f"/tasks/{tid}/cancel").status_code == 403
        assert admin.get(f"/tasks/{tid}").json()["status"] == "running"  # nothing done

        r = admin.post(f"/tasks/{tid}/cancel")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["id"], doc["cancelled"], doc["status"]) == (tid, True, "running")
        assert doc["workers"] == 1
        done = _final(admin, tid, STOPS_WITHIN + 10)
        assert done["status"] == "cancelled" and done["cancel_requested_at"] >= done["created_at"]
        out = admin.get(f"/tasks/{tid}/output").text  # follows to the end: the task is final
        assert "rest: started" in out and "[kew] attempt 1 cancelled on request" in out

        again = admin.post(f"/tasks/{tid}/cancel").json()
        assert (again["cancelled"], again["status"]) == (True, "cancelled")
        assert admin.post("/tasks/nosuchtask/cancel").status_code == 404

        other = admin.post("/queues/cancel.loop/tasks", json="other").json()["id"]
        assert admin.post(f"/tasks/{other}/cancel").json()["cancelled"] is True
        assert _final(admin, other)["status"] == "cancelled"
        found = admin.get("/tasks", params={"status": "cancelled"}).json()
        assert {tid, other} <= {t["id"] for t in found}
    audit = [line for line in server.log().splitlines() if "audit:" in line]
    assert any(f"asked to cancel task '{tid}' via API" in line for line in audit), audit
    assert not any(server.admin in line for line in server.log().splitlines())


def test_rest_cancel_of_a_finished_task_answers_with_its_status(server: CancelServer) -> None:
    with closing(server.client(server.admin)) as admin:
        tid = admin.post("/queues/cancel.quick/tasks", json="done").json()["id"]
        assert _final(admin, tid)["status"] == "succeeded"
        r = admin.post(f"/tasks/{tid}/cancel")
        assert r.status_code == 200
        assert r.json() == {
            "id": tid,
            "cancelled": False,
            "status": "succeeded",
            "detail": f"task {tid} succeeded already: nothing to cancel",
            "workers": 0,
        }
        assert admin.get(f"/tasks/{tid}").json()["status"] == "succeeded"


def test_a_cross_site_post_without_the_csrf_value_is_refused(server: CancelServer) -> None:
    with closing(server.client(server.admin)) as admin:
        tid = admin.post("/queues/cancel.loop/tasks", json="csrf").json()["id"]
        _running(admin, tid, "csrf: tick")
        c, csrf = login(server.base, server.admin)
        with closing(c):
            # what another site's form or script can send: the cookie, no CSRF value
            assert c.post(f"/tasks/{tid}/cancel").status_code == 403
            r = c.post(f"/ui/tasks/{tid}/cancel", data={"confirm": "yes"})
            assert r.status_code == 403
            r = c.post(f"/ui/tasks/{tid}/cancel", data={"confirm": "yes", "csrf": "x" + csrf})
            assert r.status_code == 403
            assert admin.get(f"/tasks/{tid}").json()["status"] == "running"  # nothing done
            r = c.post(f"/tasks/{tid}/cancel", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200 and r.json()["cancelled"] is True
        assert _final(admin, tid)["status"] == "cancelled"
