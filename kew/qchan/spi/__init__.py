"""What a broker must provide: the provider SPI.

A provider is a module with ``connect(url: str) -> Connector``, registered
under the entry-point group ``kew.providers`` with its URL scheme as the
name.  It imports this package and its own client library, nothing else of
kew.  Everything above this layer (codecs, typed channels, retries, the task
layer) is shared, so a provider only moves bytes and keeps these promises:

* ``Producer.send`` returns only once the broker has the message (durably,
  when ``Message.durable``); ``send_many`` returns only once *every* message
  of the batch is, and should pipeline so that a batch costs about one round
  trip.  A send that cannot be confirmed raises; it never drops silently.
* ``Consumer.fetch`` hands out at most ``max_count`` deliveries, and the
  consumer never holds more than its ``prefetch`` unsettled at once.  Each
  delivery is settled by exactly one of ``ack``, ``dead_letter`` or
  ``release``.  What is not settled when the consumer's process dies is
  delivered again (to this or another consumer), with a higher
  ``delivery_count``.
* A message with ``deliver_at`` is never delivered before that instant.
* ``dead_letter`` keeps the message (id, body, headers), its delivery count,
  the reason and the time, where a ``Browser`` can list, requeue and purge it.

All objects are thread-safe: producers may be shared by threads; a
consumer's ``fetch`` is called from one thread while ``ack``,
``dead_letter`` and ``release`` may come from any.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kew.core.msg import now_ms
from kew.qchan.spi.errors import (
    AccessRefused,
    BrokerUnavailable,
    ConfigError,
    ConsumerFailed,
    KewError,
    MessageTooLarge,
    ProviderNotFound,
    QueueFull,
    SendError,
)
from kew.qchan.spi.urls import ProviderURL

__all__ = [
    "PING_QUEUE",
    "AccessRefused",
    "AsyncOutboxConsumer",
    "BrokerUnavailable",
    "Browser",
    "Capability",
    "ConfigError",
    "Connector",
    "Consumer",
    "ConsumerFailed",
    "DeadLetter",
    "Delivery",
    "Headers",
    "KewError",
    "Message",
    "MessageTooLarge",
    "MultiSender",
    "OutboxConsumer",
    "Producer",
    "ProviderNotFound",
    "ProviderURL",
    "QueueFull",
    "QueueStats",
    "SendError",
    "WindowedConsumer",
    "now_ms",
]

#: Header values are strings or integers; a provider gives back exactly what
#: it was given (type included).
Headers = Mapping[str, "str | int"]


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the broker stores it.

    ``id`` is assigned by kew when the message is made and travels with it
    (through retries and dead letters).  ``headers`` hold kew's wire-format
    properties (``docs/wire-format.md``) and any the application adds.
    ``deliver_at`` (epoch ms) asks for delayed delivery; ``None`` is now.
    """

    id: str
    body: bytes
    headers: Headers = field(default_factory=dict)
    durable: bool = True
    deliver_at: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message handed to a consumer, to be settled exactly once.

    ``delivery_count`` is 1 the first time; a provider that only knows a
    "redelivered" flag reports 2 for a redelivery.  ``tag`` is the
    provider's own handle (delivery tag, stream entry id, row id ...).
    """

    message: Message
    delivery_count: int
    tag: object


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was dead-lettered, with why and when (epoch ms)."""

    message: Message
    delivery_count: int
    reason: str
    dead_at: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Queue depth by state. A count a broker cannot tell is ``-1``."""

    ready: int
    in_flight: int
    delayed: int
    dead: int


class Capability(enum.Enum):
    """Promises of the contract that a provider may be unable to keep.

    A connector lists the ones it lacks in ``Connector.lacks`` with the
    reason; the conformance kit skips exactly those tests and prints why.
    """

    #: Messages survive the connector being closed and reopened (and a
    #: broker restart, for a broker that persists).
    DURABLE = "durable"
    #: Several OS processes can produce to and consume from one queue.
    MULTIPROCESS = "multiprocess"
    #: ``deliver_at`` is honoured.
    DELAYED_DELIVERY = "delayed-delivery"
    #: ``Browser.peek`` can read ready messages without removing them.
    BROWSE = "browse"


class Producer(Protocol):
    """Sends to one queue."""

    def send(self, message: Message) -> None:
        """Return once the broker has ``message``; raise if it cannot."""
        ...

    def send_many(self, messages: Sequence[Message]) -> None:
        """Return once the broker has every one of ``messages``.

        On error, raise: the caller must assume any of the batch may or may
        not have been stored, and resend (consumers see at-least-once).
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class MultiSender(Protocol):
    """Optional, on a :class:`Connector`: one send to several queues.

    The task layer sends a task and its ``queued`` status event (two
    queues) this way, batched across the threads submitting at once; a
    connector without it gets the same guarantee from one ``send_many``
    per queue, one round trip each.
    """

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """Store every ``(queue, message)`` (each queue declared before) in
        one round trip where the broker allows; return once all are durable
        (confirmed, committed); raise if any is not.

        Checks every message (size) before anything is written.  On error,
        as ``send_many``: any of them may or may not have been stored.
        """
        ...


class Consumer(Protocol):
    """Receives from one queue, holding at most ``prefetch`` unsettled."""

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        """Wait up to ``timeout`` seconds for at least one delivery.

        Returns between 0 and ``max_count`` deliveries (0 on timeout).
        Raises :class:`ConsumerFailed` once the consumer cannot deliver any
        more (a dead I/O thread), and may raise any other error for a
        passing fault (the runtime retries).  A message whose envelope it
        cannot read is never an error here: it is dead-lettered with the
        reason (:mod:`kew.qchan.spi.wire`) and the fetch goes on.
        """
        ...

    def ack(self, delivery: Delivery) -> None:
        """The consumer is done: the message leaves the queue."""
        ...

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the message to the queue's dead letters with ``reason``."""
        ...

    def release(self, delivery: Delivery) -> None:
        """Hand the message back for redelivery (graceful shutdown)."""
        ...

    def close(self) -> None:
        """Stop; every unsettled delivery is handed back."""
        ...


@runtime_checkable
class WindowedConsumer(Protocol):
    """A push consumer whose broker-side window can change while it runs.

    Optional.  The runtime makes a consumer with its concurrency as the
    prefetch and, while the handlers are short, widens the window through
    this (``kew.qchan._window``); a consumer without it keeps the window it
    was made with.  A pull consumer (one that takes only what ``fetch``
    asks for) may have it too: then it only moves the bound ``fetch``
    keeps to.
    """

    def set_prefetch(self, count: int) -> None:
        """Let the broker push up to ``count`` unsettled deliveries from now on.
        Deliveries already received stay valid (ackable, not redelivered).
        May block for a round trip; called rarely (the runtime uses hysteresis)."""
        ...


class Browser(Protocol):
    """Reads a queue and its dead letters without consuming."""

    def peek(self, limit: int) -> Sequence[Message]:
        """Up to ``limit`` ready messages, oldest first, none removed."""
        ...

    def stats(self) -> QueueStats: ...

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""
        ...

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Put dead letters (all, or those with these message ids) back on
        the queue, each sent durably before it is removed from the dead
        letters.  Returns how many."""
        ...

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        """Delete dead letters (all, or these ids). Returns how many."""
        ...

    def purge(self) -> int:
        """Delete every ready and delayed message. Returns how many (or -1)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class OutboxConsumer(Protocol):
    """Optional: a consumer that settles with an outbox.

    ``settle`` sends messages to other queues *and* acks deliveries in one
    step, atomically where the broker can (one transaction), in about one
    round trip.  The task layer uses it to make an attempt's last status
    events (or its next attempt) durable together with the ack, batched
    across concurrent handlers.  A consumer without it gets the same
    guarantee from ``send_many`` then ``ack``.
    """

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Store each ``(queue, message)`` durably and ack ``acks``.

        Returns once every message is stored and every delivery acked; a
        delivery this consumer no longer holds is skipped (its message is
        still sent).  Never acks a delivery unless the sends are stored.  On
        error, raise: any of the messages may or may not have been stored,
        and deliveries not acked are delivered again.
        """
        ...


@runtime_checkable
class AsyncOutboxConsumer(Protocol):
    """Optional, on top of :class:`OutboxConsumer`: a settle that does not
    wait.  For a provider whose broker answers on an I/O thread of its own
    (RabbitMQ's confirms): no thread sleeps through the round trip, and the
    next group commit starts from the callback."""

    def settle_async(
        self,
        acks: Sequence[Delivery],
        sends: Sequence[tuple[str, Message]],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Like ``OutboxConsumer.settle``, but returns at once; ``done`` is
        called exactly once, with None when every message is stored and
        every delivery acked, else with the error (deliveries not acked are
        delivered again).  ``done`` may be called on the provider's I/O
        thread, or before this returns: it must not block."""
        ...


@runtime_checkable
class Connector(Protocol):
    """A connection to one broker, from a URL."""

    #: The URL with any password replaced by ``***``.
    url: str
    #: Largest body the provider accepts; larger sends raise MessageTooLarge.
    max_message_size: int
    #: Capabilities this provider lacks, each with the reason.
    lacks: Mapping[Capability, str]

    def declare(self, queue: str) -> None:
        """Create ``queue`` and its dead letters if missing (idempotent)."""
        ...

    def producer(self, queue: str) -> Producer: ...

    def consumer(self, queue: str, prefetch: int) -> Consumer: ...

    def browser(self, queue: str) -> Browser: ...

    def delete(self, queue: str) -> None:
        """Remove ``queue``, its delayed messages and dead letters."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Any:
        """A connector is a context manager that closes it (inherit
        :class:`ConnectorBase` for this and ``ping``)."""
        ...

    def __exit__(self, *exc: object) -> None: ...


#: The queue :meth:`ConnectorBase.ping` declares (it stays empty).
PING_QUEUE = "kew.ping"


class ConnectorBase:
    """What kew's own connectors share, for a provider to inherit: use as a
    context manager (``with kew.connect(url) as conn:`` closes it), and
    :meth:`ping`.  Not part of the :class:`Connector` protocol: a third-party
    connector need not have it (``kew.ping`` works on any connector)."""

    def declare(self, queue: str) -> None:  # pragma: no cover - the provider's
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - the provider's
        raise NotImplementedError

    def ping(self) -> float:
        """Talk to the broker now (``connect()`` does not): declare the queue
        :data:`PING_QUEUE`, and return the seconds it took.  Raises what the
        first operation would: ``AccessRefused``, ``BrokerUnavailable``,
        ``ConfigError``."""
        import time

        start = time.monotonic()
        self.declare(PING_QUEUE)
        return time.monotonic() - start

    def __enter__(self) -> ConnectorBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
