"""kew for asyncio programs: the typed queues of :mod:`kew`, awaited.

    import kew.aio

    conn = kew.aio.connect("redis://localhost/0")      # no I/O yet
    q = kew.aio.Queue(conn, "thumbnails", Thumbnail)
    await q.send(Thumbnail(image_id=1))                # returns once the broker has it

    async def render(t: Thumbnail) -> None: ...

    async with q.sink(render, concurrency=8):          # 8 coroutines, the window adapts
        ...

    async with q.deliveries(prefetch=4) as stream:     # or one by one, settled by hand
        async for d in stream:
            await d.ack()

The same semantics, wire format, headers and dead-letter reasons as the sync
API (a message sent by one is consumed by the other).  Each provider is
reached by its native async route when it has one
(:class:`kew.qchan.spi.aio.SupportsAio`), else through a bounded thread pool
(the bridge); docs/async.md lists the route of each.
"""

from __future__ import annotations

from kew.connect import connect as _connect_sync
from kew.qchan import DeadLetterInfo, InvalidValue
from kew.qchan.spi import Connector
from kew.qchan.spi.aio import AsyncConnector, SupportsAio

from ._bridge import DEFAULT_THREADS, BridgeConnector
from ._queue import DeadLetters, Deliveries, Delivery, Queue, QueueBrowser, check_async
from ._runtime import Subscription

__all__ = [
    "AsyncConnector",
    "DeadLetterInfo",
    "DeadLetters",
    "Deliveries",
    "Delivery",
    "InvalidValue",
    "Queue",
    "QueueBrowser",
    "Subscription",
    "check_async",
    "connect",
    "from_sync",
    "route",
]


def from_sync(connector: Connector, *, threads: int = DEFAULT_THREADS) -> AsyncConnector:
    """The async connector for a sync one, which it takes over (its
    ``close()`` closes ``connector``): the provider's native route when it has
    one (``connector.aio()``), else the thread bridge, whose shared pool has
    ``threads`` threads (each consumer's fetch has one of its own)."""
    if isinstance(connector, SupportsAio):
        return connector.aio()
    return BridgeConnector(connector, threads)


def connect(url: str | None = None, *, threads: int = DEFAULT_THREADS) -> AsyncConnector:
    """Connect to the broker at ``url`` (as :func:`kew.connect`: else
    ``$KEW_URL``, else the SQLite default), for asyncio.  Does no I/O and
    needs no running loop; close it with ``await conn.close()``."""
    return from_sync(_connect_sync(url), threads=threads)


def route(connector: AsyncConnector) -> str:
    """``"bridge"`` when ``connector`` runs a sync provider in threads, else
    ``"native"``."""
    return "bridge" if isinstance(connector, BridgeConnector) else "native"
