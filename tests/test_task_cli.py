"""The ``kew`` CLI run as a user runs it (a subprocess), on SQLite in a tmp dir:
help, queues, dead letters, and clear one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
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
    ["serve"],
]


def test_help_for_every_command() -> None:
    for command in COMMANDS:
        r = run_kew(*command, "--help")
        assert r.returncode == 0, (command, r.stderr)
        assert "Usage:" in r.stdout, command
        assert r.stderr == "", (command, r.stderr)
    top = run_kew("--help").stdout
    for name in ("worker", "recorder", "send", "queues", "dead", "task", "serve"):
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
    r = run_kew("dead", "purge", "jobs", "--all", "--url", url)
    assert r.returncode == 0
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
