"""Command tasks: one external process per attempt.

``App.command_task(name, T, build)`` declares a task queue whose handler
runs ``build(data)`` (a :class:`CommandSpec` or an argv list):

* the command runs in its own session and process group, so a time limit
  (or the task cancelled, or a worker handing the task back) kills the whole
  group: SIGTERM first, SIGKILL after ``kill_grace`` seconds if anything is
  left;
* stdout and stderr go to one pipe (as ``2>&1`` does), read line by line
  as they come and appended to the task's output in the order written;
* the exit code decides: ``exit_codes`` maps codes to ``"success"``,
  ``"retry"`` or ``"permanent"``; by default 0 is success and anything
  else (a signal too) retries.  A time limit reached retries.
* ``nice`` lowers the command's priority (``nice -n N`` prefix).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Literal

from kew.task.context import TaskContext
from kew.task.errors import Permanent, Retry

__all__ = ["CommandResult", "CommandSpec", "ExitAction", "check_result", "run_command"]

ExitAction = Literal["success", "retry", "permanent"]
"""What an exit code means (``exit_codes={3: "permanent"}``): the task succeeded, the
attempt failed and the retry policy decides, or the task failed for good."""

#: Seconds between SIGTERM and SIGKILL when a command must stop.
KILL_GRACE = 5.0


@dataclass(frozen=True)
class CommandSpec:
    """What to run: ``argv`` (no shell), extra ``env`` (added to the
    worker's environment), ``cwd``, and per-command ``timeout`` / ``nice``
    overriding the task queue's."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    timeout: float | None = None
    nice: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.argv, (str, bytes)):
            raise TypeError(
                f"CommandSpec.argv must be a list of arguments, not a string ({self.argv!r}); "
                "no shell is involved"
            )
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError(
                f"CommandSpec.argv must be a non-empty list of strings, not {self.argv!r}"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"CommandSpec.timeout must be positive seconds, not {self.timeout!r}")


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: the ``argv`` run (with a ``nice`` prefix, if any), its
    ``returncode`` (negative: killed by that signal), whether its time limit was
    reached (``timed_out``) or the task was cancelled or handed back
    (``cancelled``), and the wall-clock ``seconds`` it ran."""

    argv: tuple[str, ...]
    returncode: int
    timed_out: bool
    cancelled: bool
    seconds: float


def _spec(value: CommandSpec | Sequence[str]) -> CommandSpec:
    return value if isinstance(value, CommandSpec) else CommandSpec(list(value))


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pump(stream: IO[bytes], ctx: TaskContext) -> None:
    with stream:
        for raw in iter(stream.readline, b""):
            ctx.log(raw.decode("utf-8", errors="replace"))


def run_command(
    spec: CommandSpec | Sequence[str],
    ctx: TaskContext,
    *,
    timeout: float | None = None,
    nice: int | None = None,
    kill_grace: float = KILL_GRACE,
) -> CommandResult:
    """Run ``spec`` to its end (or its time limit, or the task's
    cancellation), streaming its output into ``ctx``."""
    spec = _spec(spec)
    limit = spec.timeout if spec.timeout is not None else timeout
    niceness = spec.nice if spec.nice is not None else nice
    argv = list(spec.argv)
    if niceness is not None:
        nice_bin = shutil.which("nice")
        if nice_bin is None:
            raise Permanent("nice is not installed, so the command cannot run with a niceness")
        argv = [nice_bin, "-n", str(int(niceness)), *argv]
    env = None
    if spec.env:
        env = {**os.environ, **spec.env}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise Permanent(f"cannot run {argv[0]!r}: {e.strerror} ({e.filename})") from None
    except PermissionError as e:
        raise Permanent(f"cannot run {argv[0]!r}: {e.strerror}") from None
    except OSError as e:
        raise Retry(f"cannot start {argv[0]!r}: {e}") from None
    pgid = proc.pid  # a new session: the group id is the leader's pid
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, ctx), daemon=True)
    pump.start()
    deadline = None if limit is None else started + limit
    timed_out = cancelled = False
    while True:
        wait = 0.1
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            pass
        if ctx.cancelled.is_set():
            cancelled = True
        elif deadline is not None and time.monotonic() >= deadline:
            timed_out = True
        else:
            continue
        _kill_group(pgid, signal.SIGTERM)
        try:
            proc.wait(kill_grace)
        except subprocess.TimeoutExpired:
            _kill_group(pgid, signal.SIGKILL)
            proc.wait()
        break
    # Whatever the leader left behind in its group goes too.
    _kill_group(pgid, signal.SIGKILL)
    pump.join(5.0)
    return CommandResult(
        tuple(argv), proc.returncode, timed_out, cancelled, time.monotonic() - started
    )


def check_result(
    result: CommandResult,
    exit_codes: Mapping[int, ExitAction] | None,
    ctx: TaskContext,
    limit: float | None,
) -> None:
    """Map a command's result to success (return) or Retry / Permanent."""
    name = os.path.basename(result.argv[0])
    if result.timed_out:
        ctx.log(f"[kew] {name}: time limit of {limit} s reached; process group killed")
        raise Retry(f"{name} timed out after {limit} s")
    if result.cancelled:
        if ctx.cancel_requested:  # (the attempt ends "cancelled" whatever this raises)
            ctx.log(f"[kew] {name}: the task was cancelled; its process group was killed")
            raise Retry(f"{name} was stopped: the task was cancelled")
        raise Retry(f"{name} was stopped: the worker handed the task back")
    code = result.returncode
    if code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = f"signal {-code}"
        action: ExitAction = (exit_codes or {}).get(code, "retry")
        message = f"{name} was killed by {what}"
    else:
        action = (exit_codes or {}).get(code, "success" if code == 0 else "retry")
        message = f"{name} exited with code {code}"
    if action == "success":
        return
    if action == "permanent":
        raise Permanent(message)
    if action == "retry":
        raise Retry(message)
    raise ValueError(f"unknown exit action {action!r} for exit code {code}")
