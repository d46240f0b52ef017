"""The RabbitMQ provider's native async route: ``RabbitConnector.aio()``,
which :func:`kew.aio.connect` takes.  pika, as the sync provider: its
connections run by I/O threads of kew's, which wake the event loop
(``loop.call_soon_threadsafe``) when the broker has answered; no coroutine
waits on a thread.

The wire format, headers, delay queues, dead-letter reasons, errors and
reconnects are the sync provider's, by its own code
(:mod:`kew_rabbitmq._envelope`, :mod:`kew_rabbitmq._connection`,
:mod:`kew_rabbitmq._consumer`), so a message sent by one route is consumed
by the other.

* **Sends** (every producer of a connector, and ``send_to``) go through one
  publishing connection (:mod:`kew_rabbitmq._aio_publisher`): concurrent
  sends are pipelined on its confirm-mode channel, each ``await`` returning
  once its own messages are confirmed.  ``send_many`` is the same, one
  batch (``batch=tx`` is the sync route's: here batches are always
  pipelined with confirms).
* **Consumers**: :mod:`kew_rabbitmq._aio_consumer` (the sync consumer's I/O
  thread, pushing deliveries within ``prefetch``, awaited).
* **Declares, deletes and browsing** are the sync connector's and
  browser's, run one at a time on a thread of the connector's own
  (:mod:`kew.qchan.spi._aio_connector`, as STOMP's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kew.qchan.spi import Message, MessageTooLarge
from kew.qchan.spi._aio_connector import OverSyncConnector
from kew_rabbitmq._aio_consumer import RabbitAsyncConsumer
from kew_rabbitmq._aio_publisher import Publisher

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

__all__ = ["RabbitAsyncConnector"]


class RabbitAsyncConnector(OverSyncConnector["RabbitConnector"]):
    """``RabbitConnector.aio()``: the same broker, awaited; takes the sync
    connector over (``close()`` closes it)."""

    def __init__(self, sync: RabbitConnector) -> None:
        super().__init__(sync, "kew-amqp-aio-admin")
        #: Every send of this connector: one connection, pipelined confirms.
        self.publisher = Publisher(sync)

    def __repr__(self) -> str:
        return f"RabbitAsyncConnector({self.url!r})"

    async def send(self, sends: Sequence[tuple[str, Message]], label: str) -> None:
        """Every message checked first (size), then published with whatever
        other sends are on their way; returns once all are confirmed."""
        for queue, m in sends:
            if len(m.body) > self.max_message_size:
                raise MessageTooLarge(len(m.body), self.max_message_size, queue)
        if sends:
            await self.publisher.send(list(sends), label)

    async def _close_sends(self) -> None:
        await self.publisher.close()

    async def consumer(self, queue: str, prefetch: int) -> RabbitAsyncConsumer:
        return await RabbitAsyncConsumer.start(self.sync, queue, prefetch)
