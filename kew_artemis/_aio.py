"""The STOMP provider's native async route: ``StompConnector.aio()``, which
:func:`kew.aio.connect` takes.  stomp.py, as the sync provider: its
receiver threads read RECEIPT and MESSAGE frames and wake the event loop
(``loop.call_soon_threadsafe``, in batches); no coroutine waits on a thread.

The wire format, headers, delayed sends, dead-letter reasons, errors,
failover and reconnects are the sync provider's, by its own code
(:mod:`kew_artemis._frames`, :mod:`kew_artemis._link`), so a message sent
by one route is consumed by the other.

* **Sends** (every producer of a connector, and ``send_to``) go through one
  connection of the connector's, written by a writer thread
  (:class:`kew_artemis._aio_link.Pipe`): each SEND carries ``persistent:true``
  and a receipt, and each ``await`` returns once the broker has receipted
  its own frames, so concurrent sends are pipelined (a thousand awaits are
  a thousand receipts in flight on one connection), written together (one
  socket write for the frames of a turn of the writer).  With
  ``batch=tx`` (ActiveMQ's default: it syncs its journal for every plain
  SEND, one at a time per connection) the sends of a turn, from however
  many coroutines, go in one transaction whose COMMIT's receipt resolves
  them all: each await still returns once its own message is stored.  A
  lost connection's unreceipted sends are written again on a new one
  (at-least-once, three attempts).
* **Consumers**: :mod:`kew_artemis._aio_consumer` (the sync consumer's
  connection thread, deliveries handed to the loop, ACKs receipted).
* **Declares, deletes and browsing** are the sync connector's and
  browser's, run one at a time on a thread of the connector's own: STOMP
  has no browse, and ActiveMQ's browsing subscription (or the take and
  hand back elsewhere) is a conversation of many frames with idle
  timeouts; rare calls whose waits never hold up a send or a fetch.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from kew.qchan.spi import (
    Capability,
    Message,
    MessageTooLarge,
    now_ms,
)
from kew.qchan.spi.aio import ThreadBrowser
from kew_artemis._aio_consumer import StompAsyncConsumer
from kew_artemis._aio_link import AioLink, Op, Pipe
from kew_artemis._frames import send_frame

if TYPE_CHECKING:
    from kew_artemis.provider import StompConnector

__all__ = ["StompAsyncConnector", "StompAsyncProducer"]

R = TypeVar("R")


class StompAsyncConnector:
    """``StompConnector.aio()``: the same broker, awaited; takes the sync
    connector over (``close()`` closes it)."""

    #: Longest ``close`` waits for the sends asked for, then the writer.
    CLOSE_WAIT = 10.0

    def __init__(self, sync: StompConnector) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks: Mapping[Capability, str] = sync.lacks
        o = sync.options
        #: Every send of this connector: one connection, receipts in flight.
        self.pipe = Pipe(o, sync.url, "kew-stomp-aio-send", lambda: AioLink(o, sync.url))
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kew-stomp-aio-admin")
        self._closed = False

    def __repr__(self) -> str:
        return f"StompAsyncConnector({self.url!r})"

    async def call(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)`` on the connector's admin thread, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args))

    def ops(self, sends: Sequence[tuple[str, Message]]) -> list[Op]:
        """The SEND frames of ``sends`` (MessageTooLarge before any is sent)."""
        now = now_ms()
        sync = self.sync
        g = sync.options.delay_granularity
        out: list[Op] = []
        for queue, m in sends:
            if len(m.body) > self.max_message_size:
                raise MessageTooLarge(len(m.body), self.max_message_size, queue)
            dest, headers = send_frame(sync.dialect, queue, m, now=now, granularity=g)
            out.append(("send", dest, m.body, headers))
        return out

    async def send(self, sends: Sequence[tuple[str, Message]], label: str) -> None:
        """Write the SEND frames, return once every one is receipted."""
        ops = self.ops(sends)
        if ops:
            tx = self.sync.options.batch == "tx"
            await self.pipe.submit(ops, label=label, tx=tx)

    async def declare(self, queue: str) -> None:
        await self.call(self.sync.declare, queue)

    async def producer(self, queue: str) -> StompAsyncProducer:
        return StompAsyncProducer(self, queue)

    async def consumer(self, queue: str, prefetch: int) -> StompAsyncConsumer:
        return await StompAsyncConsumer.start(self.sync, queue, prefetch)

    async def browser(self, queue: str) -> ThreadBrowser:
        return ThreadBrowser(self.call, self.sync.browser(queue))

    async def delete(self, queue: str) -> None:
        await self.call(self.sync.delete, queue)

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: every message checked first (size), then
        written with whatever other sends are on their way; returns once
        all are receipted (on error any of them may or may not be stored)."""
        label = ", ".join(repr(q) for q in dict.fromkeys(q for q, _ in sends))
        await self.send(sends, label)

    async def close(self) -> None:
        """After the sends already asked for are receipted: the sending
        connection and the sync connector are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.pipe.close(self.CLOSE_WAIT)
            await self.call(self.sync.close)
        finally:
            self._admin.shutdown(wait=False)


class StompAsyncProducer:
    def __init__(self, connector: StompAsyncConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._label = repr(queue)

    async def send(self, message: Message) -> None:
        await self._c.send(((self._queue, message),), self._label)

    async def send_many(self, messages: Sequence[Message]) -> None:
        await self._c.send([(self._queue, m) for m in messages], self._label)

    async def close(self) -> None:
        pass  # the connector's sending connection is shared
