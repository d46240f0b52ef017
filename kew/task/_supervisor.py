"""Several worker processes under one supervisor: ``kew worker --processes N``.

Each child is an ordinary ``kew worker`` process, started with
:mod:`subprocess` (not forked: each opens its own connections), in a
process group of its own so that a Ctrl-C in a terminal reaches the
supervisor only, which passes it on once.

* A child that exits while the supervisor is not stopping (a crash, a
  SIGKILL, exit code 1 after its consumer failed for good) is started again
  after a back-off: 0.25 s, doubling with each death of that child within
  ``death_window`` seconds, at most 8 s.
* More than ``max_deaths`` deaths (all children together) within
  ``death_window`` seconds is a crash loop: the supervisor stops the others
  and :meth:`Supervisor.run` returns 1, with :attr:`Supervisor.failure`
  saying why.
* SIGTERM or SIGINT: every child gets SIGTERM (its graceful stop: running
  tasks get the child's grace period); a second signal sends a second
  SIGTERM (the children hand everything back at once).  The supervisor
  waits for them (a child still running ``grace`` + 15 s later is killed)
  and returns 0 when every child stopped gracefully.
* ``health_file``: child ``n`` (1..N) keeps ``<health_file>.<n>``; the
  supervisor keeps ``<health_file>`` while every child runs and its file
  exists and is fresh.
* A child knows it is one: ``$KEW_WORKER_PROCESS`` is its number (1..N) and
  ``$KEW_SUPERVISOR_PID`` the supervisor's pid (``kew worker`` stops by
  itself when that process is gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Supervisor"]

log = logging.getLogger("kew.supervisor")

#: More deaths than this within DEATH_WINDOW seconds is a crash loop.
MAX_DEATHS = 5
DEATH_WINDOW = 60.0
#: Back-off before a dead child is started again: FIRST, doubling, at most MAX.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 8.0
#: Seconds between looks at the children's health files.
HEALTH_INTERVAL = 1.0
#: A child's health file not touched for this long does not count (children
#: touch theirs every 2 s).
HEALTH_STALE = 10.0
#: Seconds after the grace period before a child still running is killed.
KILL_MARGIN = 15.0
#: How often the supervisor looks at its children.
TICK = 0.1


class _Child:
    """One slot: its process (None while waiting to be started again)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.proc: subprocess.Popen[bytes] | None = None
        self.due = 0.0  # monotonic time to start it (when proc is None)
        self.deaths: deque[float] = deque()


class Supervisor:
    """Run ``processes`` children, ``command(n)`` each (n = 1..N)."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        processes: int,
        *,
        grace: float = 30.0,
        health_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_deaths: int = MAX_DEATHS,
        death_window: float = DEATH_WINDOW,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self.command = command
        self.grace = grace
        self.health_file = Path(health_file) if health_file is not None else None
        self.env = dict(os.environ if env is None else env)
        self.max_deaths = max_deaths
        self.death_window = death_window
        self.children = [_Child(n) for n in range(1, processes + 1)]
        #: Why the supervisor gave up (a crash loop); None otherwise.
        self.failure: str | None = None
        self._deaths: deque[float] = deque()
        self._signals = 0
        self._stopping = False

    def child_health_file(self, n: int) -> Path | None:
        """The health file child ``n`` keeps (None without ``health_file``)."""
        return None if self.health_file is None else Path(f"{self.health_file}.{n}")

    def pids(self) -> list[int]:
        """The pids of the children running now."""
        return [c.proc.pid for c in self.children if c.proc is not None]

    # -- life -------------------------------------------------------------------------

    def run(self) -> int:
        """Start the children and supervise them until SIGTERM/SIGINT (or a
        crash loop); returns the exit code: 0 when every child stopped
        gracefully, 1 otherwise."""
        old: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            for child in self.children:
                self._start(child)
            next_health = 0.0
            while not self._stopping:
                self._reap()
                now = time.monotonic()
                for child in self.children:
                    if child.proc is None and not self._stopping and now >= child.due:
                        self._start(child)
                if now >= next_health:
                    self._update_health()
                    next_health = now + HEALTH_INTERVAL
                time.sleep(TICK)
            if self.failure is None:
                log.info("kew worker supervisor: stopping %d processes", len(self.pids()))
            return self._shutdown()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._remove(self.health_file)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._stopping = True

    def _start(self, child: _Child) -> None:
        self._remove(self.child_health_file(child.n))
        env = {
            **self.env,
            "KEW_WORKER_PROCESS": str(child.n),
            "KEW_SUPERVISOR_PID": str(os.getpid()),
        }
        child.proc = subprocess.Popen(
            list(self.command(child.n)),
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor only
        )
        log.info("kew worker supervisor: process %d started (pid %d)", child.n, child.proc.pid)

    def _reap(self) -> None:
        for child in self.children:
            proc = child.proc
            if proc is None or proc.poll() is None:
                continue
            child.proc = None
            self._remove(self.child_health_file(child.n))
            if self._stopping:
                continue
            now = time.monotonic()
            for deaths in (self._deaths, child.deaths):
                deaths.append(now)
                while deaths and deaths[0] < now - self.death_window:
                    deaths.popleft()
            why = _how_it_ended(proc.returncode)
            if len(self._deaths) > self.max_deaths:
                self.failure = (
                    f"worker processes keep dying: {len(self._deaths)} deaths within "
                    f"{self.death_window:g} s (the last: process {child.n} {why}); giving up"
                )
                log.error("kew worker supervisor: %s", self.failure)
                self._stopping = True
                return
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(child.deaths) - 1))
            child.due = now + delay
            log.warning(
                "kew worker supervisor: process %d (pid %d) %s; starting it again in %.2f s",
                child.n,
                proc.pid,
                why,
                delay,
            )

    def _shutdown(self) -> int:
        """SIGTERM every child, wait for them (a second signal: SIGTERM
        again), kill those left after grace + KILL_MARGIN."""
        self._remove(self.health_file)
        graceful = True
        procs = [(c.n, c.proc) for c in self.children if c.proc is not None]
        for _, proc in procs:
            _signal(proc, signal.SIGTERM)
        sent = self._signals
        deadline = time.monotonic() + self.grace + KILL_MARGIN
        while any(p.poll() is None for _, p in procs):
            if self._signals > sent and self._signals >= 2:
                sent = self._signals
                log.warning("kew worker supervisor: second signal, passing it on")
                for _, proc in procs:
                    _signal(proc, signal.SIGTERM)
            if time.monotonic() > deadline:
                for n, proc in procs:
                    if proc.poll() is None:
                        log.error("kew worker supervisor: process %d did not stop; killing it", n)
                        _signal(proc, signal.SIGKILL)
                        proc.wait()
                        graceful = False
                break
            time.sleep(TICK)
        for n, proc in procs:
            code = proc.wait()
            self._remove(self.child_health_file(n))
            # (-SIGTERM: it had not set up its signal handling yet: nothing to finish)
            if code not in (0, -signal.SIGTERM):
                log.warning("kew worker supervisor: process %d %s", n, _how_it_ended(code))
                graceful = False
        for child in self.children:
            child.proc = None
        if self.failure is not None:
            return 1
        log.info("kew worker supervisor: every process stopped")
        return 0 if graceful else 1

    # -- health -----------------------------------------------------------------------

    def _update_health(self) -> None:
        path = self.health_file
        if path is None:
            return
        healthy = all(c.proc is not None and self._fresh(c.n) for c in self.children)
        try:
            if healthy and not self._stopping:
                path.touch()
            else:
                self._remove(path)
        except OSError as e:
            log.warning("kew worker supervisor: cannot update %s: %s", path, e)

    def _fresh(self, n: int) -> bool:
        path = self.child_health_file(n)
        try:
            return path is not None and time.time() - path.stat().st_mtime < HEALTH_STALE
        except OSError:
            return False

    @staticmethod
    def _remove(path: Path | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"
