"""The errors a user meets in the first hour, each through the real ``kew``
script of the venv in a subprocess: unknown queues (RabbitMQ's 404, a Redis
key of the wrong type, a queue the app does not declare) are one line each
after the good queues are shown, exit code 2; --metrics-port without
prometheus-client names the pip command; an app module that raises while it
is imported shows the user's file and line; ``kew task TYPO --follow``
gives up after a short bounded wait; ``kew dead purge --all`` asks first."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.testing.util import port_open, require
from tests.test_task_cli import make_dead_letters, table_rows

ROOT = Path(__file__).resolve().parent.parent
KEW = Path(sys.executable).parent / "kew"
AMQP = "amqp://guest:guest@127.0.0.1:5672/?retries=1"
REDIS_PREFIX = "kew-cli-errors"


def kew_cmd(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    full_env.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1", **(env or {})})
    return subprocess.run(
        [str(KEW), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("kew: error: ") for line in lines), r.stderr
    return lines


# -- unknown queues ----------------------------------------------------------------------


def test_unknown_queues_on_rabbitmq_are_one_line_each_after_the_good_ones() -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    good = "kew-cli-errors-good"
    conn = kew.connect(AMQP)
    try:
        q = kew.Queue(conn, good, int)
        q.browser().purge()
        q.send_many([1, 2])
    finally:
        conn.close()
    missing = [f"kew-cli-nosuch-{uuid.uuid4().hex[:8]}" for _ in range(2)]

    r = kew_cmd("queues", "--url", AMQP, "-q", missing[0], "-q", good, "-q", missing[1])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert table_rows(r.stdout)[good][0] == "2"  # the good queue is shown
    lines = error_lines(r)
    assert len(lines) == 2, r.stderr
    for line, name in zip(lines, missing, strict=True):
        assert line.startswith(f"kew: error: queue {name!r}: "), line
        assert "NOT_FOUND" in line and name in line, line
    assert "guest:guest" not in r.stdout + r.stderr

    r = kew_cmd("queues", "--url", AMQP, "-q", good, "-q", missing[0], "--json")
    assert r.returncode == 2
    (row,) = json.loads(r.stdout)
    assert row == {"queue": good, "ready": 2, "in_flight": None, "delayed": None, "dead": 0}
    assert len(error_lines(r)) == 1

    r = kew_cmd("dead", "list", missing[0], "--url", AMQP)
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = error_lines(r)
    assert line.startswith(f"kew: error: queue {missing[0]!r}: ") and "NOT_FOUND" in line
    assert r.stdout == ""


def test_a_queue_redis_refuses_is_one_line_after_the_good_ones() -> None:
    require(port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    import redis

    url = f"redis://127.0.0.1:6379/0?prefix={REDIS_PREFIX}"
    good, broken = "good", f"broken-{uuid.uuid4().hex[:8]}"
    conn = kew.connect(url)
    raw = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        q = kew.Queue(conn, good, int)
        q.browser().purge()
        q.send(1)
        # keys of the wrong type where the broken queue's stream and dead letters go
        keys: Any = conn
        raw.set(keys.keys(broken).stream, "not a stream")
        raw.set(keys.keys(broken).dead, "not a stream")
        r = kew_cmd("queues", "--url", url, "-q", good, "-q", broken)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert table_rows(r.stdout)[good] == ["1", "0", "0", "0"]
        (line,) = error_lines(r)
        assert line.startswith(f"kew: error: queue {broken!r}: ") and "WRONGTYPE" in line, line

        r = kew_cmd("dead", "list", broken, "--url", url)
        assert r.returncode == 2
        (line,) = error_lines(r)
        assert line.startswith(f"kew: error: queue {broken!r}: ") and "WRONGTYPE" in line, line
    finally:
        raw.delete(keys.keys(broken).stream, keys.keys(broken).dead)
        raw.close()
        conn.close()


def test_a_queue_the_app_does_not_declare(tmp_path: Path) -> None:
    env = {"CLI_APP_URL": f"sqlite:///{tmp_path / 'q.sqlite3'}", "CLI_APP_STORE": "memory://"}
    app = "tests.apps.cli_app:app"
    r = kew_cmd("queues", "--app", app, "-q", "greet", "-q", "gret", env=env)
    assert r.returncode == 2
    assert table_rows(r.stdout)["greet"] == ["0", "0", "0", "0"]
    (line,) = error_lines(r)
    assert "the app declares no queue 'gret'" in line and "greet" in line

    r = kew_cmd("dead", "list", "gret", "--app", app, env=env)
    assert r.returncode == 2
    (line,) = error_lines(r)
    assert "the app declares no queue 'gret'" in line


# -- metrics without prometheus-client ---------------------------------------------------


def test_metrics_port_without_prometheus_client_names_the_extra(tmp_path: Path) -> None:
    blocked = tmp_path / "site"
    blocked.mkdir()
    # as if prometheus-client were not installed: its import fails
    (blocked / "sitecustomize.py").write_text(
        "import sys\nsys.modules['prometheus_client'] = None\n"
    )
    env = {
        "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}",
        "CLI_APP_URL": f"sqlite:///{tmp_path / 'q.sqlite3'}",
        "CLI_APP_STORE": "memory://",
    }
    check = subprocess.run(
        [sys.executable, "-c", "import prometheus_client"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr  # really blocked

    started = time.monotonic()
    r = kew_cmd("worker", "tests.apps.cli_app:app", "--metrics-port", "0", env=env)
    assert time.monotonic() - started < 30  # at once, not a worker that runs
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = error_lines(r)
    assert "--metrics-port needs prometheus-client" in line
    assert "pip install 'ome-kew[metrics]'" in line


# -- the user's module -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "line", "error"),
    [
        ('import os\n\nURL = os.environ["KEW_TEST_NO_SUCH_VARIABLE"]\n', 3, "KeyError"),
        ("x = 1\nrender_thumbnails()\n", 2, "NameError"),
        ("import os\nimport no_such_dependency_xyz\n", 2, "ModuleNotFoundError"),
    ],
    ids=["KeyError", "NameError", "missing-dependency"],
)
def test_an_error_in_the_users_module_shows_its_file_and_line(
    tmp_path: Path, source: str, line: int, error: str
) -> None:
    module = tmp_path / "svc_broken.py"
    module.write_text(source)
    for spec in ("svc_broken:app", f"{module}:app"):
        r = kew_cmd("worker", spec, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
        assert r.returncode == 2, (spec, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):", r.stderr
        assert f'File "{module}", line {line}, in <module>' in r.stderr, r.stderr
        assert any(x.startswith(f"{error}: ") for x in lines), r.stderr
        assert "importlib" not in r.stderr and "kew/cli" not in r.stderr, r.stderr
        assert lines[-1].startswith(f"kew: error: cannot load {spec!r}: {error}: "), lines[-1]


def test_a_module_that_does_not_exist_is_still_one_line(tmp_path: Path) -> None:
    r = kew_cmd("worker", "missing:app", cwd=tmp_path)
    assert r.returncode == 2
    assert error_lines(r) == ["kew: error: cannot load 'missing:app': no module named 'missing'"]


# -- kew task TYPO --follow ---------------------------------------------------------------


def test_following_a_task_the_store_does_not_know_gives_up_soon(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'tasks.sqlite3'}"
    started = time.monotonic()
    r = kew_cmd("task", "3f2a-typo", "--follow", "--store", store)
    took = time.monotonic() - started
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = error_lines(r)
    assert "no task '3f2a-typo' in the store after waiting 5 s" in line, line
    assert 5 <= took < 30, took  # waited the documented 5 s, not forever

    r = kew_cmd("task", "3f2a-typo", "--store", store)  # without --follow: at once
    assert r.returncode == 2
    (line,) = error_lines(r)
    assert "no task '3f2a-typo' in the store (" in line


# -- kew dead purge --all -------------------------------------------------------------------


def _purge_on_a_terminal(url: str, answer: str) -> tuple[int, str, str]:
    """``kew dead purge jobs --all`` with a terminal as stdin, answering."""
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    full_env.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1"})
    proc = subprocess.Popen(
        [str(KEW), "dead", "purge", "jobs", "--all", "--url", url],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        text=True,
    )
    os.close(slave)
    try:
        os.write(master, answer.encode() + b"\n")  # (the terminal keeps it until read)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    return proc.returncode, out, err


def test_purging_every_dead_letter_asks_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    make_dead_letters(url, "jobs", 3)

    def dead() -> int:
        conn = kew.connect(url)
        try:
            return kew.Queue(conn, "jobs", int).browser().stats().dead
        finally:
            conn.close()

    r = kew_cmd("dead", "purge", "jobs", "--all", "--url", url)  # a script: stdin no terminal
    assert r.returncode == 2
    (line,) = error_lines(r)
    assert "add --yes" in line
    assert dead() == 3

    code, out, err = _purge_on_a_terminal(url, "n")
    assert "Delete 3 dead letters of 'jobs' for good? [y/N]" in err, err
    assert code == 1 and "nothing purged" in err and out == "", (code, out, err)
    assert dead() == 3

    code, out, err = _purge_on_a_terminal(url, "y")
    assert code == 0, err
    assert out.strip() == "purged 3 dead letters on jobs"
    assert dead() == 0


def test_a_kew_error_in_the_users_module_is_one_line_naming_the_line(tmp_path: Path) -> None:
    module = tmp_path / "svc_url.py"
    module.write_text("from kew.task import App\n\napp = App('nosuch://host/x')\n")
    r = kew_cmd("worker", "svc_url:app", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2
    (line,) = error_lines(r)
    assert "no kew provider for 'nosuch://host/x'" in line
    assert line.endswith(f"({module} line 3)"), line
