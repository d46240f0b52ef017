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
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from kew.qchan.spi import (
    Browser,
    Capability,
    DeadLetter,
    Message,
    MessageTooLarge,
    QueueStats,
)
from kew_rabbitmq._aio_consumer import RabbitAsyncConsumer
from kew_rabbitmq._aio_publisher import Publisher

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

__all__ = ["RabbitAsyncBrowser", "RabbitAsyncConnector", "RabbitAsyncProducer"]

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

    async def browser(self, queue: str) -> RabbitAsyncBrowser:
        return RabbitAsyncBrowser(self, self.sync.browser(queue))

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


class RabbitAsyncBrowser:
    """The sync browser (:class:`~kew_rabbitmq._browser.RabbitBrowser`), on
    the connector's admin thread."""

    def __init__(self, connector: RabbitAsyncConnector, sync: Browser) -> None:
        self._call = connector.call
        self._sync = sync

    async def peek(self, limit: int) -> Sequence[Message]:
        return await self._call(self._sync.peek, limit)

    async def stats(self) -> QueueStats:
        return await self._call(self._sync.stats)

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return await self._call(self._sync.dead_letters, limit)

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._call(self._sync.requeue_dead, ids)

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._call(self._sync.purge_dead, ids)

    async def purge(self) -> int:
        return await self._call(self._sync.purge)

    async def close(self) -> None:
        pass
