"""Prometheus metrics for task workers (extra ``metrics``: prometheus-client).

    from kew.task import metrics
    metrics.install(app)        # count the app's task events from now on
    metrics.serve(9100)         # or: kew worker svc:app --metrics-port 9100

What is exported (one registry, :data:`REGISTRY`; ``render()`` gives its
text exposition for a web ``/metrics`` endpoint):

- ``kew_tasks_started_total{queue}``: attempts started (``running`` events)
- ``kew_tasks_succeeded_total{queue}``, ``kew_tasks_failed_total{queue}``
  (final failures), ``kew_tasks_retried_total{queue}`` (attempts that failed
  and were rescheduled)
- ``kew_task_duration_seconds{queue,outcome}``: handler time of each attempt
  (``outcome`` = succeeded | retried | failed): from the time stamp of the
  attempt's ``running`` event to that of its end event, both seen in this
  process (the worker's)
- ``kew_queue_depth{queue,state}``: ready / in_flight / delayed / dead of
  every queue the app declares, read from the broker at scrape time (a count
  the broker cannot tell is left out); or, with ``render(depths=...)``, the
  depths its async caller read already (the web's ``/metrics``: no broker
  call then, so it renders on the event loop)

Counters are per process: each worker exports what it ran.  Prometheus sums
them across workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kew.qchan.spi import QueueStats
from kew.task.model import TaskEvent

__all__ = ["CONTENT_TYPE", "REGISTRY", "TaskMetrics", "install", "render", "serve"]

log = logging.getLogger("kew.metrics")

#: The content type of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Where every kew metric lives (not prometheus_client's global registry, so
#: that an application's own metrics and kew's do not clash; ``serve`` and
#: ``render`` export both when asked).
REGISTRY = CollectorRegistry(auto_describe=True)

#: Histogram buckets (seconds) for task durations: from quick no-ops to
#: hour-long imports.
BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 10, 30, 60, 300, 900, 3600, float("inf"))

STARTED = Counter("kew_tasks_started", "Task attempts started.", ["queue"], registry=REGISTRY)
SUCCEEDED = Counter("kew_tasks_succeeded", "Tasks that succeeded.", ["queue"], registry=REGISTRY)
FAILED = Counter(
    "kew_tasks_failed",
    "Tasks that failed for good (permanent error or retries exceeded).",
    ["queue"],
    registry=REGISTRY,
)
RETRIED = Counter(
    "kew_tasks_retried",
    "Task attempts that failed and were rescheduled.",
    ["queue"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "kew_task_duration_seconds",
    "Time from an attempt's start to its end.",
    ["queue", "outcome"],
    buckets=BUCKETS,
    registry=REGISTRY,
)

#: The depths ``render(depths=...)`` exports (None: read the installed apps'
#: queues from the broker), for the render under way in this context.
_GIVEN: contextvars.ContextVar[Mapping[str, QueueStats] | None] = contextvars.ContextVar(
    "kew_metrics_depths", default=None
)

_ENDS = {"succeeded": "succeeded", "retry-scheduled": "retried", "failed": "failed"}
_COUNTERS = {
    "running": STARTED,
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "retry-scheduled": RETRIED,
}

#: Attempts started more than this long ago whose end was never seen (the
#: task was handed back, the event went elsewhere) are forgotten.
_STALE_S = 24 * 3600.0


class TaskMetrics:
    """Counts one app's task events; reads its queues' depth at scrape time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        #: (task id, attempt) -> epoch ms of its running event
        self._started: dict[tuple[str, int], int] = {}
        self._last_sweep = time.monotonic()

    def on_event(self, event: TaskEvent) -> None:
        """The ``app.on_event`` listener: never raises."""
        try:
            self._count(event)
        except Exception:  # a metrics bug must not break a worker
            log.exception("kew: metrics could not count %s", event.kind)

    def _count(self, event: TaskEvent) -> None:
        counter = _COUNTERS.get(event.kind)
        if counter is None:
            return
        counter.labels(event.queue).inc()
        key = (event.task_id, event.attempt)
        if event.kind == "running":
            now = time.monotonic()
            with self._lock:
                self._started[key] = event.at
                if now - self._last_sweep > 600:
                    self._last_sweep = now
                    self._sweep(event.at)
            return
        with self._lock:
            started = self._started.pop(key, None)
        if started is not None:
            seconds = max(0, event.at - started) / 1000
            DURATION.labels(event.queue, _ENDS[event.kind]).observe(seconds)

    def _sweep(self, now_ms: int) -> None:
        for key, t in list(self._started.items()):
            if now_ms - t > _STALE_S * 1000:
                del self._started[key]

    @property
    def running(self) -> int:
        """Attempts started here whose end has not been seen yet."""
        with self._lock:
            return len(self._started)


class _DepthCollector(Collector):
    """``kew_queue_depth{queue,state}`` from the broker, at scrape time."""

    def __init__(self) -> None:
        self._apps: list[Any] = []
        self._browsers: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()

    def add(self, app: Any) -> None:
        with self._lock:
            if all(a is not app for a in self._apps):
                self._apps.append(app)

    def describe(self) -> Iterable[Any]:
        return [
            GaugeMetricFamily(
                "kew_queue_depth", "Messages in a queue, by state.", labels=["queue", "state"]
            )
        ]

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "kew_queue_depth", "Messages in a queue, by state.", labels=["queue", "state"]
        )
        given = _GIVEN.get()
        if given is not None:  # read already, by an async caller: no I/O here
            for name, stats in given.items():
                _add(family, name, stats)
            yield family
            return
        with self._lock:
            seen: set[str] = set()
            for app in self._apps:
                for name in self._names(app):
                    if name in seen:
                        continue
                    seen.add(name)
                    try:
                        stats = self._browser(app, name).stats()
                    except Exception as e:
                        log.warning("kew: metrics cannot read the depth of %s: %s", name, e)
                        self._forget(app, name)
                        continue
                    _add(family, name, stats)
        yield family

    @staticmethod
    def _names(app: Any) -> list[str]:
        try:
            return list(app.queue_names())
        except Exception as e:
            log.warning("kew: metrics cannot list the app's queues: %s", e)
            return []

    def _browser(self, app: Any, name: str) -> Any:
        key = (id(app), name)
        b = self._browsers.get(key)
        if b is None:
            app.connector.declare(name)  # queues are declared on first use
            b = self._browsers[key] = app.connector.browser(name)
        return b

    def _forget(self, app: Any, name: str) -> None:
        b = self._browsers.pop((id(app), name), None)
        if b is not None:
            with contextlib.suppress(Exception):
                b.close()


def _add(family: GaugeMetricFamily, name: str, stats: QueueStats) -> None:
    for state in ("ready", "in_flight", "delayed", "dead"):
        value = getattr(stats, state)
        if value >= 0:
            family.add_metric([name, state], value)


_DEPTH = _DepthCollector()
REGISTRY.register(_DEPTH)
_installed: dict[int, TaskMetrics] = {}
_install_lock = threading.Lock()


def install(app: Any) -> TaskMetrics:
    """Count ``app``'s task events (via ``app.on_event``) and export its
    queues' depth.  Installing the same app again does nothing more."""
    with _install_lock:
        m = _installed.get(id(app))
        if m is not None and m.app is app:
            return m
        m = TaskMetrics(app)
        app.on_event(m.on_event)
        _DEPTH.add(app)
        _installed[id(app)] = m
        return m


def render(
    *, include_default: bool = False, depths: Mapping[str, QueueStats] | None = None
) -> bytes:
    """The text exposition of kew's metrics (and, with ``include_default``,
    of prometheus_client's default registry: process metrics, the app's own).

    ``depths``: the queue depths to export (queue name: its stats), read
    already, e.g. by a coroutine with ``await browser.stats()``; then
    ``kew_queue_depth`` has those, the broker is not called, and the render
    does no I/O (an event loop may call it).  Default: the depths of every
    queue of the installed apps, read from the broker now."""
    token = _GIVEN.set(depths)
    try:
        out = generate_latest(REGISTRY)
    finally:
        _GIVEN.reset(token)
    if include_default:
        from prometheus_client import REGISTRY as DEFAULT

        out += generate_latest(DEFAULT)
    return bytes(out)


class _Both(Collector):
    """kew's registry and the default one, served together."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY as DEFAULT

        yield from REGISTRY.collect()
        yield from DEFAULT.collect()


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` (kew's and the default registry's) over HTTP on a
    daemon thread; returns the port (useful with ``port=0``)."""
    both = CollectorRegistry(auto_describe=False)
    both.register(_Both())
    server, _ = _start_http_server(port, addr=addr, registry=both)
    return int(server.server_port)
