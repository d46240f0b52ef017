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
  browser's, run one at a time on a thread of the connector's own, which
  owns the sync connector's connection: rare calls (a queue is declared
  once) whose blocking waits never hold up a send or a fetch.
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
)
from kew.qchan.spi.aio import ThreadBrowser
from kew_rabbitmq._aio_consumer import RabbitAsyncConsumer
from kew_rabbitmq._aio_publisher import Publisher

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

__all__ = ["RabbitAsyncConnector", "RabbitAsyncProducer"]

R = TypeVar("R")


class RabbitAsyncConnector:
    """``RabbitConnector.aio()``: the same broker, awaited; takes the sync
    connector over (``close()`` closes it)."""

    def __init__(self, sync: RabbitConnector) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks: Mapping[Capability, str] = sync.lacks
        #: Every send of this connector: one connection, pipelined confirms.
        self.publisher = Publisher(sync)
        # declares, deletes, browsing: the sync connector's connection, on a
        # thread of its own (started at the first call)
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kew-amqp-aio-admin")
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitAsyncConnector({self.url!r})"

    async def call(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)`` on the connector's admin thread, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args))

    def check_size(self, queue: str, m: Message) -> None:
        if len(m.body) > self.max_message_size:
            raise MessageTooLarge(len(m.body), self.max_message_size, queue)

    async def declare(self, queue: str) -> None:
        await self.call(self.sync.declare, queue)

    async def producer(self, queue: str) -> RabbitAsyncProducer:
        return RabbitAsyncProducer(self, queue)

    async def consumer(self, queue: str, prefetch: int) -> RabbitAsyncConsumer:
        return await RabbitAsyncConsumer.start(self.sync, queue, prefetch)

    async def browser(self, queue: str) -> ThreadBrowser:
        return ThreadBrowser(self.call, self.sync.browser(queue))

    async def delete(self, queue: str) -> None:
        await self.call(self.sync.delete, queue)

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: every message checked first (size), then
        published with whatever other sends are on their way; returns once
        all are confirmed (as ``send_many``: on error any of them may or
        may not be stored)."""
        for queue, m in sends:
            self.check_size(queue, m)
        if sends:
            label = ", ".join(repr(q) for q in dict.fromkeys(q for q, _ in sends))
            await self.publisher.send(list(sends), label)

    async def close(self) -> None:
        """After the sends already asked for are confirmed: the publishing
        connection and the sync connector are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.publisher.close()
            await self.call(self.sync.close)
        finally:
            self._admin.shutdown(wait=False)


class RabbitAsyncProducer:
    def __init__(self, connector: RabbitAsyncConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._label = repr(queue)

    async def send(self, message: Message) -> None:
        self._c.check_size(self._queue, message)
        await self._c.publisher.send(((self._queue, message),), self._label)

    async def send_many(self, messages: Sequence[Message]) -> None:
        for m in messages:  # MessageTooLarge before anything is sent
            self._c.check_size(self._queue, m)
        if messages:
            await self._c.publisher.send([(self._queue, m) for m in messages], self._label)

    async def close(self) -> None:
        pass  # the connector's publisher is shared
