"""The async provider SPI: what :mod:`kew.aio` runs on.

It mirrors :mod:`kew.qchan.spi` one for one, with coroutines wherever there
is I/O, and uses the same :class:`~kew.qchan.spi.Message`,
:class:`~kew.qchan.spi.Delivery`, :class:`~kew.qchan.spi.DeadLetter`,
:class:`~kew.qchan.spi.QueueStats`, :class:`~kew.qchan.spi.Capability` and
errors.  Every promise of the sync SPI holds as written there (send returns
once the broker has the message; at most ``prefetch`` unsettled; settled
once, settling twice a no-op; what is unsettled when a process dies comes
back with a higher ``delivery_count``; ``deliver_at`` never early; dead
letters keep id, body, headers, count, reason and time; any envelope ends as
a delivery or a dead letter; ``ConsumerFailed`` from ``fetch`` once it can
never deliver again).  A message sent through one SPI is read through the
other: they are two routes to the same queues, with the same wire format.

**How a provider offers it.**  Its sync connector gets a method
``aio() -> AsyncConnector`` (:class:`SupportsAio`): the provider's *native*
async route.  :func:`kew.aio.connect` makes the sync connector (which does no
I/O), and calls ``aio()`` when it has one, else wraps the sync connector in
the thread bridge (``kew/aio/_bridge.py``: every blocking call in a bounded
thread pool), the fallback for providers without a native route.  ``aio()``
hands the connector over: the async connector's ``close()`` closes whatever
it uses, the sync connector included.

What the async side promises on top of the sync contract:

* **No await parks a thread for a broker round trip** on a native route: a
  coroutine waits on the event loop (an asyncio client, or a wake-up from
  the provider's own I/O thread through ``loop.call_soon_threadsafe``).
  Work that never waits on the network (a lock held for microseconds, an
  in-process structure) may run inline.
* **Cancellation loses nothing.**  A coroutine may be cancelled (a
  subscription stopping, a timeout).  A cancelled ``fetch`` keeps no
  delivery for itself: what it took from the broker is handed back, or
  delivered again later as after a crash.  A cancelled ``send`` may or may
  not have stored the message, as when it raises.
* **One event loop.**  The objects a connector makes are used from one
  event loop at a time; a consumer's ``fetch`` is awaited by one task at a
  time, while ``ack``, ``dead_letter`` and ``release`` may come from any task
  of that loop.  ``kew.aio.connect()`` itself does no I/O and needs no loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from kew.qchan.spi import Browser, Capability, DeadLetter, Delivery, Message, QueueStats

R = TypeVar("R")

__all__ = [
    "AsyncBatchAcker",
    "AsyncBrowser",
    "AsyncConnector",
    "AsyncConsumer",
    "AsyncMultiSender",
    "AsyncProducer",
    "AsyncWindowedConsumer",
    "Caller",
    "SupportsAio",
    "ThreadBrowser",
]


class AsyncProducer(Protocol):
    """Sends to one queue (:class:`kew.qchan.spi.Producer`, awaited)."""

    async def send(self, message: Message) -> None:
        """Return once the broker has ``message``; raise if it cannot."""
        ...

    async def send_many(self, messages: Sequence[Message]) -> None:
        """Return once the broker has every one of ``messages`` (about one
        round trip); on error, any of them may or may not be stored."""
        ...

    async def close(self) -> None: ...


class AsyncConsumer(Protocol):
    """Receives from one queue, holding at most ``prefetch`` unsettled
    (:class:`kew.qchan.spi.Consumer`, awaited)."""

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        """Wait up to ``timeout`` seconds for at least one delivery, without
        holding a thread; return 0 to ``max_count`` of them.  Raises
        :class:`~kew.qchan.spi.ConsumerFailed` once the consumer can never
        deliver again, anything else for a passing fault.  Cancelled, it
        keeps nothing for itself (see the module's promises)."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """The consumer is done: the message leaves the queue."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the message to the queue's dead letters with ``reason``."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Hand the message back for redelivery."""
        ...

    async def close(self) -> None:
        """Stop; every unsettled delivery is handed back."""
        ...


class AsyncBrowser(Protocol):
    """Reads a queue and its dead letters without consuming
    (:class:`kew.qchan.spi.Browser`, awaited)."""

    async def peek(self, limit: int) -> Sequence[Message]:
        """Up to ``limit`` ready messages, oldest first, none removed."""
        ...

    async def stats(self) -> QueueStats:
        """The queue's counts by state; -1 where the broker cannot tell."""
        ...

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""
        ...

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Put dead letters (all, or these ids) back on the queue; how many."""
        ...

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        """Delete dead letters (all, or these ids); how many."""
        ...

    async def purge(self) -> int:
        """Delete every ready and delayed message; how many (or -1)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class AsyncConnector(Protocol):
    """A connection to one broker, for asyncio programs
    (:class:`kew.qchan.spi.Connector`, awaited).  Making one does no I/O;
    every method that may talk to the broker is a coroutine."""

    #: The URL with any password replaced by ``***``.
    url: str
    #: Largest body the provider accepts; larger sends raise MessageTooLarge.
    max_message_size: int
    #: Capabilities this provider lacks, each with the reason.
    lacks: Mapping[Capability, str]

    async def declare(self, queue: str) -> None:
        """Create ``queue`` and its dead letters if missing (idempotent)."""
        ...

    async def producer(self, queue: str) -> AsyncProducer:
        """A producer for ``queue`` (may open a channel: a coroutine)."""
        ...

    async def consumer(self, queue: str, prefetch: int) -> AsyncConsumer:
        """A consumer of ``queue`` holding at most ``prefetch`` unsettled."""
        ...

    async def browser(self, queue: str) -> AsyncBrowser:
        """A browser of ``queue`` and its dead letters."""
        ...

    async def delete(self, queue: str) -> None:
        """Remove ``queue``, its delayed messages and dead letters."""
        ...

    async def close(self) -> None:
        """Close everything this connector uses (the sync connector it came
        from included)."""
        ...


@runtime_checkable
class AsyncWindowedConsumer(Protocol):
    """An async consumer whose window can change while it runs: the async
    :class:`~kew.qchan.spi.WindowedConsumer` (optional).  The subscription
    opens the consumer with its concurrency as the prefetch and widens the
    window through this while the handlers are short; a pull consumer only
    moves the bound its ``fetch`` keeps to."""

    async def set_prefetch(self, count: int) -> None:
        """Hold (or let the broker push) up to ``count`` unsettled deliveries
        from now on; those held already stay valid.  May take a round trip,
        never blocking the loop; called rarely (the policy has hysteresis)."""
        ...


@runtime_checkable
class AsyncBatchAcker(Protocol):
    """An async consumer that acks many deliveries in one step (optional):
    a group of acks is then one call (one transaction, one round trip)."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack every one of ``deliveries``; if it raises, none may be
        acked (the subscription hands them all back)."""
        ...


@runtime_checkable
class AsyncMultiSender(Protocol):
    """Optional, on an :class:`AsyncConnector`: one send to several queues
    (:class:`kew.qchan.spi.MultiSender`, awaited).  The task layer's
    ``submit_async`` uses it when the route has it, else the sync one in a
    thread."""

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """Store every ``(queue, message)`` in one round trip where the
        broker allows; return once all are durable; raise if any is not."""
        ...


@runtime_checkable
class SupportsAio(Protocol):
    """A sync :class:`~kew.qchan.spi.Connector` with a native async route."""

    def aio(self) -> AsyncConnector:
        """The async connector for the same URL, without I/O; it takes this
        connector over (its ``close()`` closes this one too)."""
        ...


class Caller(Protocol):
    """Awaits ``fn(*args)`` somewhere off the loop (a connector's own
    thread)."""

    def __call__(self, fn: Callable[..., R], *args: object) -> Awaitable[R]: ...


class ThreadBrowser:
    """An :class:`AsyncBrowser` over a sync :class:`~kew.qchan.spi.Browser`,
    each call awaited through ``call`` (a thread of the connector's): for a
    native route whose browsing is a sync exchange of frames (RabbitMQ,
    STOMP), so that it is written once."""

    def __init__(self, call: Caller, sync: Browser) -> None:
        self._call = call
        self._sync = sync

    async def peek(self, limit: int) -> Sequence[Message]:
        """The sync ``peek``, off the loop."""
        return await self._call(self._sync.peek, limit)

    async def stats(self) -> QueueStats:
        """The sync ``stats``, off the loop."""
        return await self._call(self._sync.stats)

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """The sync ``dead_letters``, off the loop."""
        return await self._call(self._sync.dead_letters, limit)

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """The sync ``requeue_dead``, off the loop."""
        return await self._call(self._sync.requeue_dead, ids)

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        """The sync ``purge_dead``, off the loop."""
        return await self._call(self._sync.purge_dead, ids)

    async def purge(self) -> int:
        """The sync ``purge``, off the loop."""
        return await self._call(self._sync.purge)

    async def close(self) -> None:
        """Nothing: the sync browser belongs to the connector."""
