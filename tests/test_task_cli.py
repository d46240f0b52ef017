"""The ``kew`` CLI run as a user runs it (a subprocess), on SQLite in a tmp dir:
help, queues, dead letters, and clear one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.testing.util import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def run_kew(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    full_env.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "kew.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """A plain table's rows by their first column (header and rule skipped)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "}) + 1
    return {line.split()[0]: line.split()[1:] for line in lines[start:] if line.strip()}


COMMANDS = [
    [],
    ["worker"],
    ["recorder"],
    ["send"],
    ["queues"],
    ["dead"],
    ["dead", "list"],
    ["dead", "show"],
    ["dead", "requeue"],
    ["dead", "purge"],
    ["task"],
    ["tasks"],
    ["serve"],
]


def test_help_for_every_command() -> None:
    for command in COMMANDS:
        r = run_kew(*command, "--help")
        assert r.returncode == 0, (command, r.stderr)
        assert "Usage:" in r.stdout, command
        assert r.stderr == "", (command, r.stderr)
    top = run_kew("--help").stdout
    for name in ("worker", "recorder", "send", "queues", "dead", "task", "tasks", "serve"):
        assert f"  {name} " in top, name


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'q.sqlite3'}"


def test_queues_table(url: str) -> None:
    conn = kew.connect(url)
    try:
        a = kew.Queue(conn, "alpha", int)
        b = kew.Queue(conn, "beta", int)
        a.send_many(range(3))
        b.post(7, deliver_at=kew.FutureTimepoint.after(3600).epoch_ms)
    finally:
        conn.close()
    r = run_kew("queues", "--url", url, "--queue", "alpha", "-q", "beta")
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    header = next(line for line in r.stdout.splitlines() if line.startswith("queue"))
    assert header.split() == ["queue", "ready", "in", "flight", "delayed", "dead"]
    assert rows["alpha"] == ["3", "0", "0", "0"]
    assert rows["beta"] == ["0", "0", "1", "0"]

    # KEW_URL is the default URL.
    r = run_kew("queues", "-q", "alpha", env={"KEW_URL": url})
    assert r.returncode == 0, r.stderr
    assert table_rows(r.stdout)["alpha"] == ["3", "0", "0", "0"]

    r = run_kew("queues", "--url", url)
    assert r.returncode == 2
    assert "--queue" in r.stderr


def make_dead_letters(url: str, queue: str, n: int) -> list[str]:
    """Dead letters made the ordinary way: a sink whose consumer raises."""
    conn = kew.connect(url)
    try:
        q = kew.Queue(conn, queue, int)
        ids = [q.post(i) for i in range(n)]

        def refuse(i: int) -> None:
            raise RuntimeError(f"cannot handle {i}\nsecond line of the reason")

        with q.sink(refuse):
            wait_for(lambda: q.browser().stats().dead == n, 15, what="dead letters")
        return ids
    finally:
        conn.close()


def test_dead_list_show_requeue_purge(url: str) -> None:
    ids = make_dead_letters(url, "jobs", 3)

    r = run_kew("dead", "list", "jobs", "--url", url)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert set(rows) == set(ids)
    for row in rows.values():
        assert row[0] == "1"  # delivered once
        assert "RuntimeError: cannot handle" in " ".join(row)
        assert "second line" not in " ".join(row)
    assert "3 dead letters on jobs" in r.stderr

    r = run_kew("dead", "show", "jobs", ids[1], "--url", url)
    assert r.returncode == 0, r.stderr
    assert f"id:         {ids[1]}" in r.stdout
    assert "RuntimeError: cannot handle 1" in r.stdout
    assert "second line of the reason" in r.stdout  # the full reason
    assert "kew-type: int" in r.stdout  # headers
    assert r.stdout.split("body:\n", 1)[1].strip() == "1"

    r = run_kew("dead", "show", "jobs", "nosuchid", "--url", url)
    assert r.returncode == 2
    assert "no dead letter nosuchid" in r.stderr

    r = run_kew("dead", "requeue", "jobs", "--url", url)
    assert r.returncode == 2
    assert "--all" in r.stderr

    r = run_kew("dead", "requeue", "jobs", ids[0], "--url", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "requeued 1 dead letter on jobs"
    conn = kew.connect(url)
    try:
        q = kew.Queue(conn, "jobs", int)
        stats = q.browser().stats()
        assert (stats.ready, stats.dead) == (1, 2)
        assert q.browser().peek() == [0]
    finally:
        conn.close()

    r = run_kew("dead", "purge", "jobs", ids[1], "--url", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "purged 1 dead letter on jobs"
    r = run_kew("dead", "list", "jobs", "--url", url)
    assert set(table_rows(r.stdout)) == {ids[2]}

    r = run_kew("dead", "requeue", "jobs", "--all", "--url", url)
    assert r.stdout.strip() == "requeued 1 dead letter on jobs"
    # --all from a script (stdin not a terminal) needs --yes.
    r = run_kew("dead", "purge", "jobs", "--all", "--url", url)
    assert r.returncode == 2
    assert "add --yes" in r.stderr
    r = run_kew("dead", "purge", "jobs", "--all", "--yes", "--url", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "purged 0 dead letters on jobs"
    r = run_kew("queues", "--url", url, "-q", "jobs")
    assert table_rows(r.stdout)["jobs"] == ["2", "0", "0", "0"]


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kew: error: ")
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_clear_errors(tmp_path: Path) -> None:
    assert_one_line_error(
        run_kew("queues", "--url", "nosuch://host/x", "-q", "a"),
        "no kew provider for 'nosuch://host/x'",
    )
    port = free_port()
    r = run_kew("queues", "--url", f"redis://:s3cret@127.0.0.1:{port}/0?retries=1", "-q", "a")
    assert_one_line_error(r, "unreachable", "***")
    assert "s3cret" not in r.stderr + r.stdout
    assert_one_line_error(
        run_kew("worker", "no_such_module_x:app"), "no module named 'no_such_module_x'"
    )
    assert_one_line_error(run_kew("worker", "os:no_such_attr"), "no attribute 'no_such_attr'")
    assert_one_line_error(run_kew("worker", "os:sep"), "not a kew.task.App")
    assert_one_line_error(run_kew("worker", str(tmp_path / "missing.py") + ":app"), "no file")
    bad = tmp_path / "broken.py"
    bad.write_text("def oops(:\n")
    assert_one_line_error(run_kew("worker", f"{bad}:app"), "syntax error")
    assert_one_line_error(run_kew("send", "q", "{}"), "--app")


def test_json_of_queues_and_dead_letters(url: str) -> None:
    ids = make_dead_letters(url, "jobs", 2)
    r = run_kew("queues", "--url", url, "-q", "jobs", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        {"queue": "jobs", "ready": 0, "in_flight": 0, "delayed": 0, "dead": 2}
    ]

    r = run_kew("dead", "list", "jobs", "--url", url, "--json")
    assert r.returncode == 0, r.stderr
    letters = json.loads(r.stdout)
    assert [d["id"] for d in letters] == ids
    for i, d in enumerate(letters):
        assert d["queue"] == "jobs" and d["delivery_count"] == 1
        assert d["body"] == str(i) and d["headers"]["kew-type"] == "int"
        assert "second line of the reason" in d["reason"]  # the full reason
        assert isinstance(d["dead_at"], int)

    r = run_kew("dead", "show", "jobs", ids[1], "--url", url, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [letters[1]]


# -- kew tasks, kew task --json ------------------------------------------------------------

TASKS_APP = r"""
import os
from kew.task import App, Permanent, current

app = App(os.environ["T_URL"], store=os.environ["T_STORE"])

@app.task("ok")
def ok(n: int) -> None:
    current().log(f"ok {n}")

@app.task("bad")
def bad(n: int) -> None:
    raise Permanent(f"Disk full on host-{n}")

@app.task("later")
def later(n: int) -> None:
    pass
"""


def iso(ms: int, tz: dt.timezone | None = dt.UTC) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.replace(tzinfo=None).isoformat() if tz is None else t.astimezone(tz).isoformat()


def test_tasks_filters_like_the_rest_api(tmp_path: Path) -> None:
    from kew.cli import load_app
    from kew.qchan.spi import now_ms

    (tmp_path / "tasks_app.py").write_text(TASKS_APP)
    env = {"T_URL": f"sqlite:///{tmp_path / 'q.sqlite3'}", "T_STORE": f"sqlite:///{tmp_path}/t.db"}
    os.environ.update(env)
    try:
        app = load_app(f"{tmp_path / 'tasks_app.py'}:app")
    finally:
        for k in env:
            os.environ.pop(k)
    try:
        ok_ids = [app.queues["ok"].submit(n) for n in range(3)]
        bad_id = app.queues["bad"].submit(7)
        w = app.worker(concurrency=2, queues=["ok", "bad"], record=True).start()
        try:

            def all_final() -> list[Any]:
                records = [app.status(t) for t in [*ok_ids, bad_id]]
                return records if all(r is not None and r.final for r in records) else []

            records = wait_for(all_final, 30, what="the tasks final")
            worker_id = w.id
            mid = max(r.created_at for r in records) + 1
            wait_for(lambda: now_ms() > mid, 5, what="the clock past the first tasks")
            later_id = app.queues["later"].submit(1, delay=3600)
            wait_for(lambda: app.status(later_id) is not None, 30, what="the later task recorded")
        finally:
            assert w.stop(10)
    finally:
        app.close()
    store = ["--store", env["T_STORE"]]

    def ids(*args: str) -> list[str]:
        r = run_kew("tasks", *store, *args)
        assert r.returncode == 0, r.stderr
        return list(table_rows(r.stdout))

    everything = ids()
    assert everything[0] == later_id  # newest first
    assert set(everything) == {*ok_ids, bad_id, later_id}
    assert ids("--status", "failed") == [bad_id]
    assert set(ids("-s", "succeeded", "-s", "failed")) == {*ok_ids, bad_id}
    assert ids("--status", "queued") == [later_id]
    assert set(ids("--queue", "ok")) == set(ok_ids)
    assert set(ids("-q", "ok", "-q", "later")) == {*ok_ids, later_id}
    assert ids("--error", "DISK FULL") == [bad_id]  # any case
    assert ids("--error", "%") == []  # a plain substring
    assert set(ids("--worker", worker_id)) == {*ok_ids, bad_id}
    assert ids("--worker", "nosuch") == []
    # --since included, --until excluded; no offset is UTC; an offset is honoured
    for since in (iso(mid), iso(mid, None), iso(mid, dt.timezone(dt.timedelta(hours=2)))):
        assert ids("--since", since) == [later_id], since
        assert set(ids("--until", since)) == {*ok_ids, bad_id}, since
    assert ids("--since", iso(mid), "--status", "failed") == []  # filters AND
    # pages
    r = run_kew("tasks", *store, "--limit", "2")
    assert list(table_rows(r.stdout)) == everything[:2]
    assert "2 tasks; more with --offset 2" in r.stderr
    assert ids("--limit", "2", "--offset", "2") == everything[2:4]

    for bad_args in (["--limit", "0"], ["--limit", "1001"], ["--since", "yesterday"]):
        r = run_kew("tasks", *store, *bad_args)
        assert_one_line_error(r, "Invalid value")
    assert_one_line_error(run_kew("tasks", *store, "--status", "done"), "'done' is not one of")

    r = run_kew("tasks", *store, "--queue", "bad", "--json")
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["id"] == bad_id and doc["queue"] == "bad" and doc["status"] == "failed"
    assert "Disk full on host-7" in doc["last_error"] and doc["worker"] == worker_id

    r = run_kew("task", ok_ids[0], *store, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["id"], doc["status"], doc["attempt"]) == (ok_ids[0], "succeeded", 1)
    assert doc["output"] == "ok 0\n"
    assert_one_line_error(run_kew("task", ok_ids[0], *store, "--json", "--follow"), "--follow")
