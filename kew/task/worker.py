"""The worker runtime: runs an app's task queues and extra consumers.

    kew worker mymodule:app --concurrency 8

* One subscription per queue; a task queue runs ``concurrency`` handlers.
  A queue declared with its own ``concurrency`` uses that.  The window
  (deliveries held ahead) adapts unless ``prefetch`` pins it: the
  concurrency while tasks run long (nothing held that another worker could
  run), more for short tasks (at most 256, or the concurrency, and 32 MiB
  of bodies), so that handlers do not wait on round trips
  (``kew.qchan._window``; ``windows()`` tells each one).
* ``run()`` blocks until SIGTERM or SIGINT.  The first signal stops taking
  work: tasks not started are handed back at once, running ones get
  ``grace`` seconds to finish; those still running then are handed back
  (cancelled: a command task's process group is killed) and recorded as
  ``queued`` again (a ``released`` event), so none is left "running".  A
  second signal hands everything back at once.
* Every ``heartbeat`` seconds a ``worker`` event tells the store the worker
  is alive.  ``healthy()`` says whether every subscription is healthy (its
  loop alive, its fetches not failing for longer than ``stall_after``, no
  work left waiting while it had room); ``health_file`` (if given) exists
  while it is: touched every ``health_interval`` seconds, removed when not.
* Cancels (``App.cancel``): the worker consumes its own control queue,
  ``<app>.control.<worker id>`` (deleted at a graceful stop), and reads the
  store's cancel marks before it takes any task and with every heartbeat
  (``poll_cancels``; default: when the app names its store or the worker
  records).  See ``kew.task._cancel`` and docs/tasks.md, "Cancel".
* A consumer that fails for good (``ConsumerFailed``: it can never deliver
  again) stops the worker gracefully, and ``run()`` raises
  :class:`WorkerFailed` (``kew worker`` exits with 1): a supervisor
  restarts it, rather than leaving a worker that takes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kew.qchan import Subscription
from kew.qchan.spi import KewError, now_ms
from kew.task._cancel import Controls
from kew.task.model import TaskEvent

if TYPE_CHECKING:
    from kew.task.app import App

__all__ = ["Worker", "WorkerFailed"]

log = logging.getLogger("kew.worker")

#: Seconds between heartbeat events.
HEARTBEAT = 5.0
#: Seconds between looks at the worker's health (for ``health_file``).
HEALTH_INTERVAL = 2.0


class WorkerFailed(KewError):
    """A consumer of the worker failed for good (``ConsumerFailed``); the
    worker stopped.  The message names the queue and why."""


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
        health_interval: float = HEALTH_INTERVAL,
        stall_after: float | None = None,
        poll_cancels: bool | None = None,
    ) -> None:
        from kew.task._events import new_worker_id

        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if not grace >= 0:
            raise ValueError(f"grace must be a non-negative number of seconds, not {grace!r}")
        self.app = app
        self.concurrency = concurrency
        if prefetch is not None and prefetch < concurrency:
            raise ValueError(f"prefetch ({prefetch}) must be >= concurrency ({concurrency})")
        #: Deliveries a task queue's subscription holds at most (None: its
        #: window adapts, from its concurrency up, while tasks are short).
        self.prefetch = prefetch
        self.record = record
        self.metrics_port = metrics_port
        self.grace = grace
        self.heartbeat = heartbeat
        self.health_file = Path(health_file) if health_file is not None else None
        self.health_interval = health_interval
        #: Seconds of failing fetches (or of work waiting undelivered) after
        #: which a subscription is unhealthy; None: the runtime's default.
        self.stall_after = stall_after
        #: Read the store's cancel marks at start and with each heartbeat
        #: (None: when the app names its store, or the worker records).
        self.poll_cancels = poll_cancels
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
        self._controls: Controls | None = None  # its control queue (cancels)
        self._started = False
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._beat_ok = time.monotonic()
        self._beater: threading.Thread | None = None
        self._prober: threading.Thread | None = None
        self._health_lock = threading.Lock()  # a probe's touch vs stop()'s removal
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
            read = self.poll_cancels
            if read is None:
                read = self.record or app.store_given
            # the cancels first: no task is taken before the store's marks are known
            self._controls = Controls(
                app, self.id, read_store=read, interval=self.heartbeat
            ).start()
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
            if self._controls is not None:
                self._controls.stop(0)
            raise
        if self.stall_after is not None:
            for sub in self._all():
                # (the runtime takes it at construction; App and Queue do not pass it on)
                sub.stall_after = self.stall_after
        self._beat()
        self._beater = threading.Thread(target=self._beat_loop, name="kew-heartbeat", daemon=True)
        self._beater.start()
        if self.health_file is not None:
            self._probe()
            self._prober = threading.Thread(target=self._probe_loop, name="kew-health", daemon=True)
            self._prober.start()
        log.info("kew worker %s: running %s", self.id, ", ".join(self.queues) or "nothing")
        return self

    def _all(self) -> list[Subscription]:
        extra = [self._recorder] if self._recorder is not None else []
        if self._controls is not None and self._controls.subscription is not None:
            extra.append(self._controls.subscription)
        return self.subscriptions + extra

    def _beat(self) -> None:
        event = TaskEvent("", "", "worker", now_ms(), worker=self.id, text=",".join(self.queues))
        try:
            self.app.emitter.emit([event])
            self._beat_ok = time.monotonic()
        except Exception as e:
            log.warning("kew worker %s: heartbeat failed: %s", self.id, e)

    def _beat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat):
            self._beat()

    def _probe(self) -> None:
        """Touch the health file while healthy, remove it when not."""
        path = self.health_file
        if path is None:
            return
        healthy = self.healthy()  # (outside the lock: it may ask the broker)
        with self._health_lock:
            if self._stopping.is_set():
                return  # stop() removes it
            try:
                if healthy:
                    path.touch()
                elif path.exists():
                    log.warning("kew worker %s: not healthy; removing %s", self.id, path)
                    path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("kew worker %s: cannot update %s: %s", self.id, path, e)

    def _remove_health_file(self) -> None:
        if self.health_file is not None:
            with self._health_lock, contextlib.suppress(OSError):
                self.health_file.unlink(missing_ok=True)

    def _probe_loop(self) -> None:
        while not self._stopping.wait(self.health_interval):
            self._probe()

    def healthy(self) -> bool:
        """Started, not stopping, every subscription healthy (its loop
        alive, its consumer not failed, its fetches not failing for longer
        than ``stall_after``, no work waiting on the broker undelivered for
        that long), and (when the app sends events) a heartbeat got through
        recently.  May ask the broker how much waits (a sink's ready count):
        call it every few seconds, not in a tight loop."""
        if not self._started or self._stopping.is_set():
            return False
        if not all(s.healthy() for s in self._all()):
            return False
        return (
            not self.app.events_enabled
            or time.monotonic() - self._beat_ok < 3 * self.heartbeat + 10
        )

    def windows(self) -> dict[str, int]:
        """The window of each of its queues' subscriptions now (deliveries
        held at most), by queue name: the concurrency while tasks run long,
        more while they are short, or the ``prefetch`` given."""
        return {sub.name: sub.window for sub in self.subscriptions}

    def failure(self) -> str | None:
        """Why the worker cannot go on (a consumer failed for good:
        ``ConsumerFailed``), naming the queue; None while it can."""
        for sub in self._all():
            if sub.error is not None:
                return f"the consumer of queue {sub.name!r} failed and cannot recover: {sub.error}"
        return None

    def _mine(self) -> list[Any]:
        return [c for c in self.app.running.active() if c.worker == self.id]

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
            self.app.running.hand_back(left)
        for t in threads:
            t.join()
        if self._controls is not None:
            self._controls.stop()
        if self._recorder is not None:
            self._recorder.stop(5.0)
        self._stopped.set()
        self._remove_health_file()
        return not left and all(finished)

    async def __aenter__(self) -> Worker:
        """``async with app.worker(...)`` (an app's lifespan): started in a
        thread; the event loop goes on meanwhile."""
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stopped gracefully (:meth:`stop`, ``grace`` seconds) in a thread."""
        await asyncio.to_thread(self.stop)

    def stop_now(self) -> None:
        """Hand everything back at once (a second signal)."""
        self._stopping.set()
        left = self._mine()
        if left:
            self.app.running.hand_back(left)
        for sub in self.subscriptions:
            sub.stop(0)
        if self._controls is not None:
            self._controls.stop(0)
        if self._recorder is not None:
            self._recorder.stop(1.0)
        self._stopped.set()
        self._remove_health_file()

    # -- blocking run with signals ---------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._signalled.set()

    def run(self) -> bool:
        """Start, block until SIGTERM/SIGINT, stop gracefully (a second
        signal: at once).  Returns True if every task finished in time.

        Raises :class:`WorkerFailed`, after a graceful stop, when a consumer
        failed for good (``ConsumerFailed``)."""
        main = threading.current_thread() is threading.main_thread()
        old: dict[signal.Signals, Any] = {}
        if main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            failure = None
            while failure is None and not self._signalled.wait(0.5):
                failure = self.failure()
            if failure is None:
                log.info("kew worker %s: stopping (grace %.1f s)", self.id, self.grace)
            else:
                log.error("kew worker %s: %s; stopping", self.id, failure)
            result: list[bool] = []
            stopper = threading.Thread(
                target=lambda: result.append(self.stop()), name="kew-worker-stop", daemon=True
            )
            stopper.start()
            at_once = 1 if failure is not None else 2  # the signal that hands back at once
            while stopper.is_alive():
                stopper.join(0.1)
                if self._signals >= at_once:
                    log.warning("kew worker %s: second signal, handing everything back", self.id)
                    self.stop_now()
                    result = [False]
                    break
            if failure is not None:
                raise WorkerFailed(failure)
            return bool(result and result[0])
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
