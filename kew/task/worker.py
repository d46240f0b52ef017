"""The worker runtime: runs an app's task queues and extra consumers.

    python -m kew.task.worker mymodule:app --concurrency 8
    kew worker mymodule:app --concurrency 8          # the same, via the CLI

* One subscription per queue; a task queue runs ``concurrency`` handlers
  with prefetch = concurrency (no hidden multiplier).  A queue declared with
  its own ``concurrency`` uses that.
* ``run()`` blocks until SIGTERM or SIGINT.  The first signal stops taking
  work: tasks not started are handed back at once, running ones get
  ``grace`` seconds to finish; those still running then are handed back
  (cancelled: a command task's process group is killed) and recorded as
  ``queued`` again (a ``released`` event), so none is left "running".  A
  second signal hands everything back at once.
* Every ``heartbeat`` seconds a ``worker`` event tells the store the worker
  is alive; ``healthy()`` says whether every subscription's loop is alive,
  and ``health_file`` (if given) is touched while it is.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kew.qchan import Subscription
from kew.qchan.spi import now_ms
from kew.task.model import TaskEvent

if TYPE_CHECKING:
    from kew.task.app import App

__all__ = ["Worker", "load_app", "main"]

log = logging.getLogger("kew.worker")

#: Seconds between heartbeat events.
HEARTBEAT = 5.0


class Worker:
    def __init__(
        self,
        app: App,
        concurrency: int = 4,
        queues: Sequence[str] | None = None,
        record: bool = False,
        metrics_port: int | None = None,
        *,
        grace: float = 30.0,
        heartbeat: float = HEARTBEAT,
        prefetch: int | None = None,
        health_file: str | os.PathLike[str] | None = None,
    ) -> None:
        from kew.task.app import new_worker_id

        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if not grace >= 0:
            raise ValueError(f"grace must be a non-negative number of seconds, not {grace!r}")
        self.app = app
        self.concurrency = concurrency
        if prefetch is not None and prefetch < concurrency:
            raise ValueError(f"prefetch ({prefetch}) must be >= concurrency ({concurrency})")
        #: Deliveries a task queue's subscription holds at most (default:
        #: its concurrency; no hidden multiplier).
        self.prefetch = prefetch
        self.record = record
        self.metrics_port = metrics_port
        self.grace = grace
        self.heartbeat = heartbeat
        self.health_file = Path(health_file) if health_file is not None else None
        self.id = new_worker_id()
        known = list(app.queues) + [q.name for q, _, _ in app.consumers]
        if queues is not None:
            unknown = [q for q in queues if q not in known]
            if unknown:
                raise ValueError(
                    f"app {app.name!r} has no queue {', '.join(map(repr, unknown))} "
                    f"(its queues: {', '.join(known) or 'none'})"
                )
        self.queues: list[str] = list(queues) if queues is not None else known
        self.subscriptions: list[Subscription] = []
        self._recorder: Subscription | None = None  # stopped last: records the hand-backs
        self._started = False
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._beat_ok = time.monotonic()
        self._beater: threading.Thread | None = None
        self._signals = 0
        self._signalled = threading.Event()

    def __repr__(self) -> str:
        return f"Worker({self.id!r}, queues={self.queues})"

    # -- life ---------------------------------------------------------------------

    def start(self) -> Worker:
        """Start consuming (returns at once)."""
        if self._started:
            raise RuntimeError("this worker was started already")
        self._started = True
        app = self.app
        if self.metrics_port is not None:
            from kew.task import metrics

            metrics.install(app)
            metrics.serve(self.metrics_port)
        try:
            for name in self.queues:
                tq = app.queues.get(name)
                if tq is not None:
                    n = tq.concurrency or self.concurrency
                    p = max(n, self.prefetch) if self.prefetch is not None else None
                    self.subscriptions.append(tq.subscribe(self.id, n, p))
            for queue, handler, n in app.consumers:
                if queue.name in self.queues:
                    self.subscriptions.append(queue.sink(handler, concurrency=n))
            if self.record:
                self._recorder = app.recorder()
        except BaseException:
            for sub in self.subscriptions:
                sub.stop(0)
            raise
        self._beat()
        self._beater = threading.Thread(target=self._beat_loop, name="kew-heartbeat", daemon=True)
        self._beater.start()
        log.info("kew worker %s: running %s", self.id, ", ".join(self.queues) or "nothing")
        return self

    def _beat(self) -> None:
        event = TaskEvent("", "", "worker", now_ms(), worker=self.id, text=",".join(self.queues))
        try:
            self.app._emit([event])
            self._beat_ok = time.monotonic()
        except Exception as e:
            log.warning("kew worker %s: heartbeat failed: %s", self.id, e)
        if self.health_file is not None and self.healthy():
            try:
                self.health_file.touch()
            except OSError as e:
                log.warning("kew worker %s: cannot touch %s: %s", self.id, self.health_file, e)

    def _beat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat):
            self._beat()

    def healthy(self) -> bool:
        """Started, not stopping, every consumer loop alive, and (when the
        app sends events) a heartbeat got through recently."""
        if not self._started or self._stopping.is_set():
            return False
        subs = self.subscriptions + ([self._recorder] if self._recorder else [])
        if not all(s.alive for s in subs):
            return False
        return (
            not self.app.events_enabled
            or time.monotonic() - self._beat_ok < 3 * self.heartbeat + 10
        )

    def _mine(self) -> list[Any]:
        return [c for c in self.app.active() if c.worker == self.id]

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking work; give running tasks ``grace`` seconds (default
        :attr:`grace`) to finish, then hand back those still running.
        Returns True if every task finished."""
        grace = self.grace if grace is None else grace
        self._stopping.set()
        deadline = time.monotonic() + grace
        margin = 0.5 if grace > 0 else 0.0
        finished: list[bool] = []
        threads = [
            threading.Thread(
                target=lambda s=sub: finished.append(s.stop(grace + margin)),
                name=f"kew-stop-{sub.name}",
                daemon=True,
            )
            for sub in self.subscriptions
        ]
        for t in threads:
            t.start()
        while any(s.alive for s in self.subscriptions) and time.monotonic() < deadline:
            time.sleep(0.005)  # each subscription has flagged itself stopping
        log.info("kew worker %s: taking no more work", self.id)
        while self._mine() and time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(0.02)
        left = self._mine()
        if left:
            log.warning(
                "kew worker %s: handing back %d running task(s) after %.1f s",
                self.id,
                len(left),
                grace,
            )
            self.app._hand_back(left)
        for t in threads:
            t.join()
        if self._recorder is not None:
            self._recorder.stop(5.0)
        self._stopped.set()
        if self.health_file is not None:
            with contextlib.suppress(OSError):
                self.health_file.unlink(missing_ok=True)
        return not left and all(finished)

    def stop_now(self) -> None:
        """Hand everything back at once (a second signal)."""
        self._stopping.set()
        left = self._mine()
        if left:
            self.app._hand_back(left)
        for sub in self.subscriptions:
            sub.stop(0)
        if self._recorder is not None:
            self._recorder.stop(1.0)
        self._stopped.set()

    # -- blocking run with signals ---------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._signalled.set()

    def run(self) -> bool:
        """Start, block until SIGTERM/SIGINT, stop gracefully (a second
        signal: at once).  Returns True if every task finished in time."""
        main = threading.current_thread() is threading.main_thread()
        old: dict[signal.Signals, Any] = {}
        if main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            while not self._signalled.wait(1.0):
                pass
            log.info("kew worker %s: stopping (grace %.1f s)", self.id, self.grace)
            result: list[bool] = []
            stopper = threading.Thread(
                target=lambda: result.append(self.stop()), name="kew-worker-stop", daemon=True
            )
            stopper.start()
            while stopper.is_alive():
                stopper.join(0.1)
                if self._signals >= 2:
                    log.warning("kew worker %s: second signal, handing everything back", self.id)
                    self.stop_now()
                    return False
            return bool(result and result[0])
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


# -- python -m kew.task.worker MODULE:APP ---------------------------------------------


def load_app(spec: str) -> App:
    """``package.module:attr`` or ``path/to/file.py:attr`` (``attr``
    defaults to ``app``)."""
    from kew.task.app import App

    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.exists():
            raise SystemExit(f"kew: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise SystemExit(f"kew: cannot import {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        sys.path.insert(0, str(path.parent.resolve()))
        mod_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"kew: {module_name} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise SystemExit(f"kew: {spec} is a {type(obj).__name__}, not a kew.task.App")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kew.task.worker", description="Run the task queues of MODULE:APP."
    )
    parser.add_argument("app", metavar="MODULE:APP")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--prefetch", type=int, help="deliveries held per task queue")
    parser.add_argument("-q", "--queue", action="append", dest="queues")
    parser.add_argument("--record", action="store_true", help="also record task events")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--health-file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("KEW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = load_app(args.app)
    try:
        worker = Worker(
            app,
            concurrency=args.concurrency,
            queues=args.queues,
            record=args.record,
            metrics_port=args.metrics_port,
            grace=args.grace,
            health_file=args.health_file,
            prefetch=args.prefetch,
        )
        worker.run()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
