"""What a native async connector built over its sync connector shares
(RabbitMQ's and STOMP's): the sync connector's rare calls on a thread of
its own, and producers that all send through the connector's one sending
connection.  Each provider keeps only its broker's sending (a publisher
with confirms, a pipe of receipted frames) and its consumer.

* **Declares, deletes and browsing** are the sync connector's and
  browser's, run one at a time on the connector's admin thread (started at
  the first call), which owns the sync connector's connection: rare calls
  (a queue is declared once) whose blocking waits never hold up a send or a
  fetch, and never park the loop.
* **Close order**: the sends already asked for end first (the provider's
  ``_close_sends``), then the sync connector closes on the admin thread,
  then the admin thread is let go, whatever failed before.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from kew.qchan.spi import Browser, Capability, Message
from kew.qchan.spi.aio import ThreadBrowser

__all__ = ["OverSyncConnector", "SharedSendProducer"]

R = TypeVar("R")


class SyncConnector(Protocol):
    """What :class:`OverSyncConnector` uses of the sync connector (read
    only: a provider's ``lacks`` may be a ``dict``)."""

    @property
    def url(self) -> str: ...

    @property
    def max_message_size(self) -> int: ...

    @property
    def lacks(self) -> Mapping[Capability, str]: ...

    def declare(self, queue: str) -> None: ...

    def browser(self, queue: str) -> Browser: ...

    def delete(self, queue: str) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=SyncConnector)


def _queues_label(sends: Sequence[tuple[str, Message]]) -> str:
    """The queues of ``sends``, each once, for an error message."""
    return ", ".join(repr(q) for q in dict.fromkeys(q for q, _ in sends))


class OverSyncConnector(Generic[S]):
    """An async connector over the sync connector ``sync``, which it takes
    over (``close()`` closes it).  A subclass sends (:meth:`send`), closes
    its sending (:meth:`_close_sends`) and makes consumers."""

    def __init__(self, sync: S, admin_thread: str) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks: Mapping[Capability, str] = sync.lacks
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix=admin_thread)
        self._closed = False

    async def call(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)`` on the connector's admin thread, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args))

    async def send(self, sends: Sequence[tuple[str, Message]], label: str) -> None:
        """Store every ``(queue, message)`` (``MessageTooLarge`` before any
        is sent); return once the broker has them all.  ``label`` names the
        queues in errors.  The provider's."""
        raise NotImplementedError

    async def _close_sends(self) -> None:
        """End the sending connection once the sends asked for are stored.
        The provider's."""
        raise NotImplementedError

    async def declare(self, queue: str) -> None:
        """The sync ``declare``, on the admin thread."""
        await self.call(self.sync.declare, queue)

    async def producer(self, queue: str) -> SharedSendProducer:
        """A producer sending through the connector's :meth:`send`."""
        return SharedSendProducer(self, queue)

    async def browser(self, queue: str) -> ThreadBrowser:
        """The sync browser, each call on the admin thread."""
        return ThreadBrowser(self.call, self.sync.browser(queue))

    async def delete(self, queue: str) -> None:
        """The sync ``delete``, on the admin thread."""
        await self.call(self.sync.delete, queue)

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: every message checked first (size), then
        sent with whatever other sends are on their way; returns once all
        are stored (on error any of them may or may not be stored)."""
        await self.send(sends, _queues_label(sends))

    async def close(self) -> None:
        """After the sends already asked for are stored: the sending
        connection and the sync connector are closed (the module's order)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._close_sends()
            await self.call(self.sync.close)
        finally:
            self._admin.shutdown(wait=False)


class SharedSendProducer:
    """An ``AsyncProducer`` of one queue, sending through its connector's
    one sending connection (which its ``close`` leaves open)."""

    def __init__(self, connector: OverSyncConnector[Any], queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._label = repr(queue)

    async def send(self, message: Message) -> None:
        """The connector's send of ``message``, awaited until stored."""
        await self._c.send(((self._queue, message),), self._label)

    async def send_many(self, messages: Sequence[Message]) -> None:
        """The connector's send of ``messages`` (``MessageTooLarge`` before
        any is sent), awaited until all are stored."""
        await self._c.send([(self._queue, m) for m in messages], self._label)

    async def close(self) -> None:
        """Nothing: the connector's sending connection is shared."""
