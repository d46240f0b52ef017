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
  browser's, run one at a time on a thread of the connector's own
  (:mod:`kew.qchan.spi._aio_connector`, as RabbitMQ's): STOMP
  has no browse, and ActiveMQ's browsing subscription (or the take and
  hand back elsewhere) is a conversation of many frames with idle
  timeouts; rare calls whose waits never hold up a send or a fetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kew.qchan.spi import Message, MessageTooLarge, now_ms
from kew.qchan.spi._aio_connector import OverSyncConnector
from kew_artemis._aio_consumer import StompAsyncConsumer
from kew_artemis._aio_link import AioLink, Op, Pipe
from kew_artemis._frames import send_frame

if TYPE_CHECKING:
    from kew_artemis.provider import StompConnector

__all__ = ["StompAsyncConnector"]


class StompAsyncConnector(OverSyncConnector["StompConnector"]):
    """``StompConnector.aio()``: the same broker, awaited; takes the sync
    connector over (``close()`` closes it)."""

    #: Longest ``close`` waits for the sends asked for, then the writer.
    CLOSE_WAIT = 10.0

    def __init__(self, sync: StompConnector) -> None:
        super().__init__(sync, "kew-stomp-aio-admin")
        o = sync.options
        #: Every send of this connector: one connection, receipts in flight.
        self.pipe = Pipe(o, sync.url, "kew-stomp-aio-send", lambda: AioLink(o, sync.url))

    def __repr__(self) -> str:
        return f"StompAsyncConnector({self.url!r})"

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

    async def _close_sends(self) -> None:
        await self.pipe.close(self.CLOSE_WAIT)

    async def consumer(self, queue: str, prefetch: int) -> StompAsyncConsumer:
        return await StompAsyncConsumer.start(self.sync, queue, prefetch)
