"""``kew send``, ``kew worker``, ``kew task [--follow]`` run as a user runs them,
on SQLite in a tmp dir, with the small app of tests/apps/cli_app.py; and the
JSON logs of ``kew worker`` and ``kew serve`` (--log-format json)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kew.testing.util import wait_for
from tests.test_task_cli import ROOT, run_kew, table_rows

APP = "tests.apps.cli_app:app"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.url = f"sqlite:///{tmp / 'q.sqlite3'}"
        self.store_url = f"sqlite:///{tmp / 'tasks.sqlite3'}"
        self.vars = {"CLI_APP_URL": self.url, "CLI_APP_STORE": self.store_url}

    def kew(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_kew(*args, env=self.vars, cwd=ROOT, timeout=timeout)

    def worker(self, *args: str, command: str = "worker") -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
        env.update({"PYTHONPATH": str(ROOT), **self.vars})
        return subprocess.Popen(
            [sys.executable, "-m", "kew.cli", command, APP, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self, task_id: str) -> str:
        from kew.task.store import open_store

        store = open_store(self.store_url)
        try:
            r = store.get(task_id)
            return r.status if r is not None else ""
        finally:
            store.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker did not stop on SIGTERM within {timeout}s:\n{err}") from None
    return proc.returncode, err


@pytest.fixture
def worker(env: Env) -> Iterator[subprocess.Popen[str]]:
    proc = env.worker("--record", "--concurrency", "2", "--grace", "10")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


ID = re.compile(r"^[0-9a-f]{32}$")


def test_send_validates_against_the_queue_type(env: Env) -> None:
    r = env.kew("send", "--app", APP, "greet", '{"name": "ann", "times": 2}')
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    assert ID.match(task_id), r.stdout

    r = env.kew("send", "--app", APP, "greet", '{"name": 3}')
    assert r.returncode == 2
    assert "invalid task for queue 'greet' (Greeting)" in r.stderr
    assert "Expected `str`, got `int` - at `$.name`" in r.stderr
    assert "Traceback" not in r.stderr

    r = env.kew("send", "--app", APP, "greet", '{"name": ')
    assert r.returncode == 2
    assert "invalid task for queue 'greet'" in r.stderr

    r = env.kew("send", "--app", APP, "nosuch", "{}")
    assert r.returncode == 2
    assert "no task queue 'nosuch'" in r.stderr

    # stdin, and a file path as MODULE:APP
    r = run_kew(
        "send",
        "--app",
        "tests/apps/cli_app.py:app",
        "greet",
        "-",
        input='{"name": "bob"}',
        env=env.vars,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr

    # Only the two valid tasks are on the queue.
    r = env.kew("queues", "--app", APP)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert rows["greet"] == ["2", "0", "0", "0"]
    assert rows["flaky"] == ["0", "0", "0", "0"]
    assert "kew.task-events" in rows  # every queue the app declares


def test_worker_runs_tasks_and_task_follow_tails_them(
    env: Env, worker: subprocess.Popen[str]
) -> None:
    r = env.kew("send", "--app", APP, "greet", '{"name": "ann", "times": 5, "pause": 0.2}')
    task_id = r.stdout.strip()
    f = env.kew("task", task_id, "--follow", "--app", APP, "--timeout", "20", "--poll", "0.1")
    assert f.returncode == 0, f.stderr
    assert f.stdout.splitlines() == [f"hello ann #{i}" for i in range(1, 6)]
    assert f"[kew] task {task_id}: succeeded" in f.stderr

    r = env.kew("task", task_id, "--store", env.store_url)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert rows["status"] == ["succeeded"]
    assert rows["queue"] == ["greet"]
    assert rows["attempt"] == ["1"]
    assert "hello ann #5" in r.stdout.split("output:", 1)[1]

    # A retried task: follow shows the retry, then success; output of both attempts.
    task_id = env.kew("send", "--app", APP, "flaky", '{"name": "cy"}').stdout.strip()
    f = env.kew("task", task_id, "--follow", "--store", env.store_url, "--timeout", "60")
    assert f.returncode == 0, f.stderr
    assert "RuntimeError: first attempt for cy fails" in f.stdout
    assert f.stdout.index("first attempt for cy fails") < f.stdout.index("second attempt for cy")
    assert f"[kew] task {task_id}: succeeded (attempt 2)" in f.stderr

    # A task that fails for good: exit code 1 and the error.
    task_id = env.kew("send", "--app", APP, "doomed", '{"name": "di"}').stdout.strip()
    f = env.kew("task", task_id, "--follow", "--store", env.store_url, "--timeout", "60")
    assert f.returncode == 1, (f.stdout, f.stderr)
    assert "di can never work" in f.stderr
    r = env.kew("task", task_id, "--store", env.store_url)
    assert table_rows(r.stdout)["status"] == ["failed"]
    # Its message is kept in the queue's dead letters, with the reason.
    r = env.kew("dead", "list", "doomed", "--app", APP)
    assert r.returncode == 0, r.stderr
    (row,) = table_rows(r.stdout).items()
    assert row[0] == task_id
    assert "permanent failure in attempt 1: di can never work" in " ".join(row[1])
    r = env.kew("dead", "show", "doomed", task_id, "--app", APP)
    assert '{"name":"di"' in r.stdout.split("body:", 1)[1].replace(" ", "")
    r = env.kew("dead", "list", "nosuch", "--app", APP)
    assert r.returncode == 2
    assert "no queue 'nosuch'" in r.stderr

    r = env.kew("task", "0" * 32, "--store", env.store_url)
    assert r.returncode == 2
    assert "no task" in r.stderr

    code, err = stop(worker)
    assert code == 0, err


def test_follow_waits_briefly_for_a_task_not_recorded_yet(
    env: Env, worker: subprocess.Popen[str]
) -> None:
    """``kew task ID --follow`` started before the task is submitted (or
    recorded) finds it within its short wait and follows it to the end."""
    task_id = os.urandom(16).hex()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    full_env.update({"PYTHONPATH": str(ROOT), **env.vars})
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kew.cli",
            "task",
            task_id,
            "--follow",
            "--store",
            env.store_url,
            "--timeout",
            "60",
            "--poll",
            "0.1",
        ],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = env.kew("send", "--app", APP, "--id", task_id, "greet", '{"name": "gus", "times": 2}')
        assert r.stdout.strip() == task_id, r.stderr
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, err
    assert out.splitlines() == ["hello gus #1", "hello gus #2"]
    code, err = stop(worker)
    assert code == 0, err


def test_worker_sigterm_finishes_the_running_task_and_exits_0(env: Env) -> None:
    # The events go through a separate `kew recorder`, as in production.
    recorder = env.worker(command="recorder")
    proc = env.worker("--grace", "30")
    try:
        mark = env.tmp / "eve.started"
        body = json.dumps({"name": "eve", "times": 3, "pause": 0.5, "mark": str(mark)})
        task_id = env.kew("send", "--app", APP, "greet", body).stdout.strip()
        wait_for(mark.exists, 30, what="the task to start")
        code, err = stop(proc)
        assert code == 0, err
        assert "Traceback" not in err
        # Finished within the grace period: not lost, not left running.
        wait_for(lambda: env.status(task_id) == "succeeded", 30, what="the task's success")
        code, err = stop(recorder)
        assert code == 0, err
    finally:
        for p in (proc, recorder):
            if p.poll() is None:
                p.kill()
                p.communicate()
    r = env.kew("task", task_id, "--store", env.store_url)
    assert r.stdout.rstrip().endswith("hello eve #3")
    r = env.kew("queues", "--app", APP)
    assert table_rows(r.stdout)["greet"] == ["0", "0", "0", "0"]


def test_worker_with_record_records_the_last_task_before_exiting(env: Env) -> None:
    """With --record the worker's own recorder stops last: a task finished
    during the grace period is recorded before the process exits."""
    proc = env.worker("--record", "--grace", "30")
    try:
        mark = env.tmp / "fay.started"
        body = json.dumps({"name": "fay", "times": 3, "pause": 0.5, "mark": str(mark)})
        task_id = env.kew("send", "--app", APP, "greet", body).stdout.strip()
        wait_for(mark.exists, 30, what="the task to start")
        code, err = stop(proc)
        assert code == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert env.status(task_id) == "succeeded"


# -- --log-format json ---------------------------------------------------------------------

LOG_APP = r"""
import os
import kew
from kew.task import App

app = App(os.environ["T_URL"], store="memory://")
inbox = kew.Queue(app.connector, "inbox", int)

def refuse(n: int) -> None:
    raise RuntimeError(f"cannot handle {n}")

app.consumer(inbox, refuse)
inbox.send(1)  # the worker's consumer fails on it: logged with its traceback at DEBUG
"""


def json_lines(err: str) -> list[dict[str, object]]:
    """Every line of stderr as a JSON object (fails on a line that is not)."""
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert isinstance(line["time"], str) and line["time"].endswith("Z"), line
    return lines


def test_worker_logs_json_lines_without_the_password(tmp_path: Path) -> None:
    secret = "pw-" + os.urandom(8).hex()
    (tmp_path / "log_app.py").write_text(LOG_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    env.update({"PYTHONPATH": str(ROOT), "T_URL": f"memory://kew:{secret}@logs"})
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kew.cli", "worker", f"{tmp_path / 'log_app.py'}:app"),
            *("--log-format", "json", "--log-level", "debug"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:  # until the consumer's failure is logged
            lines.append(line)
            if "cannot handle 1" in line:
                break
        code, rest = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, rest
    out = "".join(lines) + rest
    logs = json_lines(out)
    assert secret not in out
    assert any(
        x["logger"] == "kew.worker"
        and x["level"] == "INFO"
        and "running inbox" in str(x["message"])
        for x in logs
    ), out
    failed = [x for x in logs if "exc_info" in x]
    assert failed, out
    assert "RuntimeError: cannot handle 1" in str(failed[0]["exc_info"])
    assert str(failed[0]["exc_info"]).startswith("Traceback (most recent call last)")


def test_a_refused_login_logs_json_lines_without_the_password(tmp_path: Path) -> None:
    """RabbitMQ refuses the planted password: pika's debug lines, its
    tracebacks and kew's last word are all JSON objects, none with it."""
    from kew.testing.util import port_open, require

    require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    secret = "pw-" + os.urandom(8).hex()
    (tmp_path / "log_app.py").write_text(LOG_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    url = f"amqp://guest:{secret}@127.0.0.1:5672/?retries=1"
    env.update({"PYTHONPATH": str(ROOT), "T_URL": url})
    r = subprocess.run(
        [
            *(sys.executable, "-m", "kew.cli", "worker", f"{tmp_path / 'log_app.py'}:app"),
            *("--log-format", "json", "--log-level", "debug"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    logs = json_lines(r.stderr)
    assert secret not in r.stdout + r.stderr
    assert any(str(x["logger"]).startswith("pika") and "exc_info" in x for x in logs), r.stderr
    last = logs[-1]
    assert (last["level"], last["logger"]) == ("ERROR", "kew.cli"), last
    assert "refused the login" in str(last["message"]) and "guest:***@" in str(last["message"])


def test_serve_logs_json_lines_without_the_password(tmp_path: Path) -> None:
    pytest.importorskip("litestar")
    import urllib.request

    from kew.testing.util import free_port

    secret = "pw-" + os.urandom(8).hex()
    (tmp_path / "log_app.py").write_text(LOG_APP)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "T_URL": f"memory://kew:{secret}@logs",
            "KEW_WEB_ADMIN_TOKENS": "admin-" + os.urandom(8).hex(),
        }
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kew.cli", "serve", f"{tmp_path / 'log_app.py'}:app"),
            *("--port", str(port), "--log-format", "json", "--worker", "1"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def health() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return proc.poll() is not None  # (died: the asserts below say why)

        wait_for(health, 60, what="kew serve answering /health")
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code in (0, -signal.SIGTERM), err  # (uvicorn raises the signal again once stopped)
    logs = json_lines(err)
    assert secret not in err
    loggers = {str(x["logger"]) for x in logs}
    assert "kew.web" in loggers and "uvicorn.error" in loggers, loggers
    assert any("GET /health" in str(x["message"]) for x in logs), err  # uvicorn's access log
