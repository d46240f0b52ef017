"""The plumbing of the benchmarks that run producer and worker processes
(bench_tasks, bench_makespan, bench_scale, bench_async_tasks): a child's
environment, a producer step, a worker's stop, a failed line's logs, the
report's first words and its file.

The standard library only: the worker-side modules import it, and a
Dramatiq, Celery, Taskiq or FastStream worker must not load kew (their
start-up and memory are measured).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path


def python_path(*dirs: Path) -> str:
    """A child's PYTHONPATH: ``dirs`` first (the benchmarks, the kew
    checkout), then this process's."""
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])


def child_env(*dirs: Path, **values: str) -> dict[str, str]:
    """This process's environment with ``values`` set and ``dirs`` first on
    PYTHONPATH: a producer's or a worker's."""
    return {**os.environ, **values, "PYTHONPATH": python_path(*dirs)}


def run_step(cmd: list[str], env: Mapping[str, str], cwd: Path, timeout: float, what: str) -> str:
    """Run a producer step (enqueue, fill) to its end and return its stdout;
    RuntimeError with the tail of its stderr if it failed."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def stop_worker(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM to a worker started in a session of its own, SIGKILL to that
    session if it has not exited within ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def show_failure(e: Exception, logs: Iterable[Path]) -> None:
    """A failed line on stderr, with the tail of each of its logs."""
    print(f"  failed: {e}", file=sys.stderr)
    for log in logs:
        print(log.read_text()[-3000:], file=sys.stderr)


def machine() -> str:
    """When, where and on what a report was made (its first words)."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


def write_report(text: str, out: Path, stem: str) -> Path:
    """Print ``text`` and write it to ``out/<stem>-<date>.md``."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{datetime.now(UTC):%Y%m%d-%H%M}.md"
    path.write_text(text)
    print(f"written to {path}", file=sys.stderr)
    return path
