"""The broker from the event loop: kew.web's own async connector (kew.aio)
for the served app's broker, and the browsers it reads depths and dead
letters with.

The web opens a connection of its own to the app's broker when the
application starts, and closes it when it stops; the task app keeps its
connector (its submits, recorder and workers use it).  It connects with the
URL the app's connector was made from (:func:`kew.connect.connect_again`:
``connector.url`` masks a password, ``***``, so it cannot be used; the real
one is kept out of sight by :func:`kew.connect`, and never shown here), else
with ``connector.url`` when it hides nothing.  A connector made otherwise,
whose URL has a password, leaves the web the route of the app's own
connector (``kew.aio.from_sync``), never closed here, since closing it would
close the app's connector, which the app owns and closes.  (A memory broker
is per process and named: ``memory://name`` reaches the same one.)

On a provider with a native async route (memory, SQLite, Redis) no thread
waits on the broker; on the others kew.aio's bridge does the threading,
with one thread for the web (``threads=1``), so the provider's sync
browsers, which need not be thread-safe, are used one call at a time, even
after a caller gave up on one (a health check's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence

import kew.aio
from kew.connect import connect, connect_again
from kew.qchan.spi import Connector, DeadLetter, QueueStats
from kew.qchan.spi.aio import AsyncBrowser, AsyncConnector

__all__ = ["WebBroker"]

log = logging.getLogger("kew.web")

#: Threads of the bridge (providers without a native async route).
BRIDGE_THREADS = 1


class WebBroker:
    """The web's async connector to ``connector``'s broker (made on
    :meth:`open`, or at first use) and a browser per queue (made at its
    first use, the queue declared first)."""

    def __init__(self, connector: Connector) -> None:
        self._app_connector = connector
        self._conn: AsyncConnector | None = None
        self._owned = False
        self._browsers: dict[str, AsyncBrowser] = {}
        self._making: dict[str, asyncio.Future[AsyncBrowser]] = {}

    @property
    def connector(self) -> AsyncConnector:
        """The web's async connector (opened now if it is not: no I/O)."""
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    @property
    def owned(self) -> bool:
        """Whether the web opened this connection (and closes it), rather
        than taking the app's connector's route."""
        return self._owned

    @property
    def route(self) -> str:
        """``"native"`` or ``"bridge"`` (:func:`kew.aio.route`)."""
        return kew.aio.route(self.connector)

    def open(self) -> None:
        """Connect (no I/O: the first call talks to the broker)."""
        if self._conn is not None:
            return
        app = self._app_connector
        try:
            again = connect_again(app)
            if again is None and "***" not in app.url:
                again = connect(app.url)
        except Exception as e:  # a third party's URL that does not connect twice
            log.info("kew.web: %s: using the app's connector (%s)", app.url, e)
            again = None
        if again is not None:
            self._conn = kew.aio.from_sync(again, threads=BRIDGE_THREADS)
            self._owned = True
            return
        self._conn = kew.aio.from_sync(self._app_connector, threads=BRIDGE_THREADS)
        self._owned = False

    async def close(self) -> None:
        """Close the browsers, and the connector if the web opened it."""
        conn, self._conn = self._conn, None
        browsers, self._browsers = list(self._browsers.values()), {}
        self._making.clear()
        for b in browsers:
            with contextlib.suppress(Exception):
                await b.close()
        if conn is not None and self._owned:
            try:
                await conn.close()
            except Exception:
                log.exception("kew.web: closing the broker connection failed")

    async def browser(self, queue: str) -> AsyncBrowser:
        """The browser of ``queue`` (declared first: queues are declared on
        first use); one per queue, even when several requests ask at once."""
        found = self._browsers.get(queue)
        if found is None:
            making = self._making.get(queue)
            if making is None:
                making = self._making[queue] = asyncio.ensure_future(self._make(queue))
                making.add_done_callback(lambda f: self._made(queue, f))
            # (shielded: a request that gives up does not cancel it for the others)
            found = await asyncio.shield(making)
        return found

    def _made(self, queue: str, made: asyncio.Future[AsyncBrowser]) -> None:
        if self._making.get(queue) is not made:  # closed meanwhile
            return
        del self._making[queue]
        if not made.cancelled() and made.exception() is None:
            self._browsers[queue] = made.result()

    async def _make(self, queue: str) -> AsyncBrowser:
        conn = self.connector
        await conn.declare(queue)
        return await conn.browser(queue)

    async def stats(self, queue: str) -> QueueStats:
        return await (await self.browser(queue)).stats()

    async def dead_letters(self, queue: str, limit: int) -> Sequence[DeadLetter]:
        return await (await self.browser(queue)).dead_letters(limit)

    async def requeue(self, queue: str, ids: Collection[str] | None) -> int:
        return await (await self.browser(queue)).requeue_dead(ids)

    async def purge(self, queue: str, ids: Collection[str] | None) -> int:
        return await (await self.browser(queue)).purge_dead(ids)
