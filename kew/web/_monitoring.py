"""Monitoring routes: ``/health`` (no token; 503 when the broker does not
answer) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

import anyio
import msgspec
from litestar import Response, get
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler

from kew.qchan.spi import QueueStats
from kew.task.model import WorkerRecord
from kew.web._errors import AUTH_ERRORS
from kew.web._openapi import response_spec
from kew.web._state import web_state
from kew.web.backend import Backend

log = logging.getLogger("kew.web")


class Health(msgspec.Struct, frozen=True):
    """``ok`` when the broker answers; ``workers`` seen within the window."""

    status: Literal["ok", "unavailable"]
    broker: bool
    workers: list[WorkerRecord]
    detail: str = ""


async def _broker_check(backend: Backend) -> None:
    """A round trip to the broker through the web's async connector: the
    depths of the app's first queue."""
    names = backend.app.queue_names()
    if names:
        await backend.broker.stats(names[0])


async def _workers_seen(backend: Backend, window: float) -> list[WorkerRecord]:
    horizon = int(time.time() * 1000 - window * 1000)
    beats: list[WorkerRecord] = await backend.on_store(lambda s: list(s.workers()))
    return [w for w in beats if w.last_seen >= horizon]


@get(
    "/health",
    summary="Broker reachable, workers seen (no token needed)",
    opt={"scope": "public"},
    tags=["monitoring"],
    responses={503: response_spec(Health, "the broker is unreachable")},
)
async def health(state: State) -> Response[Health]:
    """Whether the broker answers within ``health_timeout``, and the workers seen."""
    web = web_state(state)
    backend, config = web.backend, web.config
    broker, detail = False, ""
    with anyio.move_on_after(config.health_timeout):
        try:
            await _broker_check(backend)
            broker = True
        except Exception as e:
            detail = f"broker unreachable: {type(e).__name__}"
    if not broker and not detail:
        detail = f"broker did not answer within {config.health_timeout:g} s"
    seen: list[WorkerRecord] = []
    with anyio.move_on_after(config.health_timeout):
        try:
            seen = await _workers_seen(backend, config.worker_window)
        except Exception as e:
            detail = detail or f"task store unreadable: {type(e).__name__}"
    h = Health("ok" if broker else "unavailable", broker, seen, detail)
    return Response(h, status_code=200 if broker else 503, headers={"Cache-Control": "no-cache"})


async def _depths(backend: Backend, timeout: float) -> dict[str, QueueStats]:
    """The depths of the app's queues, asked of the broker together through
    the web's async connector; a queue that fails or does not answer within
    ``timeout`` seconds is left out (and logged)."""
    names = backend.app.queue_names()
    found = await asyncio.gather(
        *(asyncio.wait_for(backend.broker.stats(name), timeout) for name in names),
        return_exceptions=True,
    )
    depths: dict[str, QueueStats] = {}
    for name, stats in zip(names, found, strict=True):
        if isinstance(stats, QueueStats):
            depths[name] = stats
        elif isinstance(stats, Exception):
            log.warning("kew.web: metrics cannot read the depth of %s: %r", name, stats)
        else:
            raise stats  # cancelled: the request was
    return depths


def _render_metrics(depths: dict[str, QueueStats]) -> bytes:
    try:
        from kew.task import metrics as task_metrics
    except ImportError:  # prometheus_client missing
        pass
    else:
        return task_metrics.render(depths=depths)
    import prometheus_client

    return bytes(prometheus_client.generate_latest())


@get(
    "/metrics",
    summary="Prometheus metrics",
    raises=AUTH_ERRORS,
    tags=["monitoring"],
    media_type="text/plain; version=0.0.4",
)
async def metrics(state: State) -> Response[bytes]:
    """The Prometheus text exposition of kew's metrics: the queue depths
    awaited through the web's async connector (``health_timeout`` each),
    then rendered on the loop (prometheus_client's collectors are sync; with
    the depths given, none does I/O)."""
    web = web_state(state)
    depths = await _depths(web.backend, web.config.health_timeout)
    return Response(_render_metrics(depths), media_type="text/plain; version=0.0.4")


#: The monitoring routes.
MONITORING_ROUTES: list[HTTPRouteHandler] = [health, metrics]
