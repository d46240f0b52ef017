"""Command tasks: real subprocesses, output in order and streamed while the
command runs, a time limit that kills a process group ignoring SIGTERM,
exit-code mapping, nice, and the process killed when a worker hands the
task back."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kew.task import App, CommandSpec, Intervals, MemoryTaskStore, NoRetry
from kew.testing.util import wait_for
from tests.task_apps import final


class Cmd(msgspec.Struct, frozen=True):
    script: str
    args: list[str] = []


@pytest.fixture
def app() -> Iterator[App]:
    a = App("memory://", store=MemoryTaskStore())
    yield a
    a.close()


def py(c: Cmd) -> list[str]:
    return [sys.executable, "-c", c.script, *c.args]


def gone(pid: int) -> bool:
    """No such process, or a zombie (killed, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


ORDERED = r"""
import sys, time
for i in range(30):
    print(f"out {i}", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
sys.stdout.write("no newline at the end")
"""


def test_output_captured_in_order_and_streamed(app: App, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    streamed = r"""
import os, sys, time
print("before the gate", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
print("after the gate", flush=True)
"""
    tq = app.command_task("cmd.ordered", Cmd, py, retry=NoRetry())
    w = app.worker(concurrency=2, record=True).start()
    try:
        tid = tq.submit(Cmd(ORDERED))
        assert final(app, tid).status == "succeeded"
        want = "".join(f"out {i}\nerr {i}\n" for i in range(30)) + "no newline at the end\n"
        assert app.output(tid)[0] == want
        # streamed: the first line is in the store while the command still runs
        tid2 = tq.submit(Cmd(streamed, [str(gate)]))
        wait_for(lambda: app.output(tid2)[0] == "before the gate\n", 10, what="streamed output")
        assert app.status(tid2).status == "running"  # type: ignore[union-attr]
        gate.touch()
        assert final(app, tid2).status == "succeeded"
        assert app.output(tid2)[0] == "before the gate\nafter the gate\n"
    finally:
        w.stop(5)


STUBBORN = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
print("ignoring SIGTERM", flush=True)
time.sleep(600)
"""


def test_time_limit_kills_a_group_that_ignores_sigterm(app: App, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    tq = app.command_task(
        "cmd.stubborn", Cmd, py, timeout=1.0, kill_grace=0.5, retry=Intervals([0.1])
    )
    w = app.worker(concurrency=1, record=True).start()
    try:
        tid = tq.submit(Cmd(STUBBORN, [str(pids)]))
        r = final(app, tid)
        assert (r.status, r.attempt) == ("failed", 2)  # a time limit retries; then no more
        assert "timed out after 1.0 s" in r.last_error
        text = app.output(tid)[0]
        assert text.count("ignoring SIGTERM") == 2
        assert f"[kew] {os.path.basename(sys.executable)}: time limit of 1.0 s reached" in text
        leader, child = map(int, pids.read_text().split())
        wait_for(lambda: gone(leader) and gone(child), 10, what="the whole group killed")
    finally:
        w.stop(5)


EXITS = r"""
import sys
print(f"exiting with {sys.argv[1]}", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_exit_code_mapping(app: App) -> None:
    tq = app.command_task(
        "cmd.exits",
        Cmd,
        py,
        retry=Intervals([0.05, 0.05]),
        exit_codes={3: "permanent", 4: "success", 0: "retry"},
    )
    w = app.worker(concurrency=4, record=True).start()
    try:
        ids = {code: tq.submit(Cmd(EXITS, [str(code)])) for code in (0, 1, 3, 4)}
        got = {code: final(app, tid) for code, tid in ids.items()}
        assert (got[4].status, got[4].attempt) == ("succeeded", 1)
        assert (got[3].status, got[3].attempt) == ("failed", 1)  # permanent: no retry
        name = os.path.basename(sys.executable)
        assert got[3].last_error == f"permanent failure in attempt 1: {name} exited with code 3"
        assert (got[1].status, got[1].attempt) == ("failed", 3)  # unmapped non-zero: retried
        assert (got[0].status, got[0].attempt) == ("failed", 3)  # mapped to retry
        assert app.output(ids[1])[0].count("exiting with 1") == 3
    finally:
        w.stop(5)


def test_default_mapping_nice_env_and_missing_program(app: App, tmp_path: Path) -> None:
    tq = app.command_task(
        "cmd.nice",
        Cmd,
        lambda c: CommandSpec(py(c), env={"KEW_T": "here"}, cwd=str(tmp_path)),
        nice=5,
        retry=NoRetry(),
    )
    missing = app.command_task(
        "cmd.missing", Cmd, lambda c: [str(tmp_path / "no-such-program")], retry=Intervals([60])
    )
    w = app.worker(concurrency=2, record=True).start()
    try:
        script = "import os; print(os.nice(0), os.environ['KEW_T'], os.getcwd())"
        tid = tq.submit(Cmd(script))
        assert final(app, tid).status == "succeeded"
        assert app.output(tid)[0] == f"{os.nice(0) + 5} here {tmp_path}\n"
        tid = missing.submit(Cmd(""))
        r = final(app, tid)  # a program that does not exist will not appear on retry
        assert (r.status, r.attempt) == ("failed", 1)
        assert "cannot run" in r.last_error and "no-such-program" in r.last_error
    finally:
        w.stop(5)


def test_handed_back_command_is_killed(app: App, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    tq = app.command_task("cmd.handback", Cmd, py, kill_grace=0.3)
    w = app.worker(concurrency=1, record=True).start()
    tid = tq.submit(Cmd(STUBBORN, [str(pids)]))
    wait_for(lambda: "ignoring SIGTERM" in app.output(tid)[0], 20, what="the command to start")
    assert not w.stop(grace=0.2)  # did not finish: handed back
    leader, child = map(int, pids.read_text().split())
    wait_for(lambda: gone(leader) and gone(child), 10, what="the group killed")
    r = wait_for(lambda: (x := app.status(tid)) is not None and x.status == "queued" and x, 10)
    assert r and r.attempt == 1
    assert "handed back" in app.output(tid)[0]
    assert tq.queue.browser().stats().ready == 1  # back on the queue, not lost


def test_command_spec_errors() -> None:
    with pytest.raises(TypeError, match="not a string"):
        CommandSpec("ls -l")
    with pytest.raises(ValueError, match="non-empty list"):
        CommandSpec([])
    with pytest.raises(ValueError, match="timeout"):
        CommandSpec(["true"], timeout=0)
