"""``amqp://`` and ``amqps://``: queues on RabbitMQ, with pika.

What the broker gives: durable queues (classic, or quorum with
``queue_type=quorum``), persistent messages and publisher confirms; a
queue's dead letters are the queue ``<q>.dead``.  ``send`` returns on the
message's confirm; ``send_many`` writes the whole batch, then waits once for
all its confirms (``batch=pipeline``, the default), or publishes it in one
AMQP transaction (``batch=tx``) (:mod:`kew_rabbitmq._producer`).

Delayed delivery needs no plugin: a message due in d ms goes to the queue
``<q>.delay.<D>`` where D is d rounded *up* to ``delay_granularity`` ms;
that queue has ``x-message-ttl=D`` and dead-letters expired messages into
``<q>``, and expires itself when unused
(:func:`~kew.qchan.spi.kit.ttl_delay_route`).  Every message in a delay
queue has the same TTL, so they expire in order, and never early.

pika is not thread-safe, so every connection here has one owner: the
connector and each producer guard theirs with a lock; a consumer runs its
own on its I/O thread, which also dead-letters at once a message whose
envelope kew cannot read (:mod:`kew_rabbitmq._consumer`,
:mod:`kew_rabbitmq._envelope`); a consumer's settles publish on a second,
confirm-mode channel of its connection and ack on the confirms
(:mod:`kew_rabbitmq._outbox`, :mod:`kew_rabbitmq._settle`).  Connections are opened at the first
operation, never by ``kew.connect`` or ``kew.Queue``, and belong to the
process that opened them: after ``os.fork`` the child opens its own.  A
refused login or virtual host is :class:`AccessRefused` at once; an
unreachable broker (or a port that does not speak AMQP) is
:class:`BrokerUnavailable` (:mod:`kew_rabbitmq._connection`).

Options (:mod:`kew_rabbitmq._options`, docs/providers/rabbitmq.md):
``queue_type`` (classic|quorum), ``retries`` (default 10),
``connection_name`` (default ``kew``), ``delay_granularity`` (ms, default
100), ``max_message_size`` (bytes, default 64 MiB), ``batch``
(pipeline|tx), ``ca_certs``, ``certfile``, ``keyfile`` (amqps://), and
pika's ``heartbeat`` (s, default 30), ``connection_attempts``,
``retry_delay``, ``socket_timeout``, ``stack_timeout``,
``blocked_connection_timeout``, ``channel_max``, ``frame_max``,
``locale``, ``client_properties``, ``ssl_options``, ``tcp_options``.  The
URL path is the virtual host.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelClosedByBroker

from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    Capability,
    ConfigError,
    ConnectorBase,
    Message,
)
from kew.qchan.spi.kit import DelayRoute
from kew_rabbitmq._browser import RabbitBrowser
from kew_rabbitmq._connection import close_quietly, open_connection, reset_in_child
from kew_rabbitmq._consumer import RabbitConsumer
from kew_rabbitmq._options import SCHEMES, Options
from kew_rabbitmq._producer import Pipeline, RabbitProducer

__all__ = [
    "SCHEMES",
    "Options",
    "Pipeline",
    "RabbitBrowser",
    "RabbitConnector",
    "RabbitConsumer",
    "RabbitProducer",
    "connect",
]

R = TypeVar("R")


# -- options (kew_rabbitmq._options: read by kew.connect without network I/O;
# an unknown one is refused with the list of those accepted) ------------------


# -- connector -------------------------------------------------------------


class RabbitConnector(ConnectorBase):
    lacks: dict[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = self.options.url
        self.max_message_size = self.options.max_message_size
        if self.options.queue_type == "quorum":
            self.lacks = {
                Capability.BROWSE: "peeking takes messages and hands them back; a quorum "
                "queue puts them behind the others and counts that as a delivery"
            }
        #: Delay queue -> when it was last declared (monotonic), shared by the
        #: connector's producers and consumers; cleared when one reconnects.
        self.delay_queues: dict[str, float] = {}
        self._delay_made: set[str] = set()  # every delay queue declared here, for delete
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: Any = None  # opened at the first operation, not here
        self._channel: Any = None
        self._sender: RabbitProducer | None = None  # send_to's (a connection of its own)
        reset_in_child(self)

    def __repr__(self) -> str:
        return f"RabbitConnector({self.url!r})"

    def _in_child(self) -> None:
        """After os.fork, in the child: the parent's connection is left
        alone, and the lock its threads may have held is new."""
        self._lock = threading.Lock()
        self._pid, self._conn, self._channel = os.getpid(), None, None

    def delay_due(self, route: DelayRoute) -> bool:
        """Whether the delay queue of ``route`` needs declaring now."""
        self._delay_made.add(route.queue)
        return route.due(self.delay_queues)

    def run(self, fn: Callable[[Any], R]) -> R:
        """Run ``fn(channel)`` on the connector's own connection, reconnecting once."""
        with self._lock:
            if self._pid != os.getpid():  # a forked parent's: left alone
                self._pid, self._conn, self._channel = os.getpid(), None, None
            for attempt in (1, 2):
                try:
                    if self._conn is None or not self._conn.is_open:
                        self._conn = open_connection(self.options)
                        self._channel = None
                    if self._channel is None or not self._channel.is_open:
                        self._channel = self._conn.channel()
                    return fn(self._channel)
                except ChannelClosedByBroker as e:
                    self._channel = None
                    raise self._refusal(e) from e
                except AMQPChannelError:
                    self._channel = None
                    raise
                except AMQPConnectionError as e:
                    self._conn = None
                    if attempt == 2:
                        raise BrokerUnavailable(
                            f"RabbitMQ at {self.url} is unreachable: {e!r}"
                        ) from None
            raise AssertionError("unreachable")

    def _refusal(self, e: ChannelClosedByBroker) -> Exception:
        """kew's error for a channel the broker closed: a permission refused
        (403), a queue declared before with other arguments (406); others as
        pika says them (404: no such queue)."""
        said = f"({e.reply_code}) {e.reply_text}"
        if e.reply_code == 403:
            return AccessRefused(
                f"RabbitMQ at {self.url} refused user {self.options.username!r} "
                f"the permission: {said}"
            )
        if e.reply_code == 406:
            return ConfigError(
                f"RabbitMQ at {self.url} refused it: {said} (a queue keeps the arguments it "
                "was declared with, such as queue_type)"
            )
        return cast(Exception, e)

    def queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": self.options.queue_type}

    def declare(self, queue: str) -> None:
        args = self.queue_arguments()

        def declare(ch: Any) -> None:
            ch.queue_declare(queue, durable=True, arguments=args)
            ch.queue_declare(f"{queue}.dead", durable=True, arguments=args)

        self.run(declare)

    def producer(self, queue: str) -> RabbitProducer:
        return RabbitProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> RabbitConsumer:
        return RabbitConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> RabbitBrowser:
        return RabbitBrowser(self, queue)

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``MultiSender``: every message published (``mandatory``, delayed
        ones to their delay queues) on one confirm-mode channel, then one
        wait for all the confirms: one round trip (or one AMQP transaction
        with ``batch=tx``).  A producer of the connector's own, made at the
        first call, does it."""
        with self._lock:
            if self._sender is None:
                self._sender = RabbitProducer(self, "")
            sender = self._sender
        sender.send_to(sends)

    def delete(self, queue: str) -> None:
        """The queue, its dead letters, and the delay queues that this
        connector declared for it (others expire by themselves)."""
        mine = re.compile(re.escape(queue) + r"\.delay\.\d+")
        delays = sorted(n for n in list(self._delay_made) if mine.fullmatch(n))

        def delete(ch: Any) -> None:
            for name in (queue, f"{queue}.dead", *delays):
                ch.queue_delete(name)

        self.run(delete)
        for name in delays:
            self._delay_made.discard(name)
            self.delay_queues.pop(name, None)

    def aio(self) -> Any:
        """The native async route (``kew.aio``): a
        :class:`kew_rabbitmq._aio.RabbitAsyncConnector`, pika's connections
        run by I/O threads that wake the event loop (concurrent sends
        pipelined on one confirm channel); no I/O here."""
        from kew_rabbitmq._aio import RabbitAsyncConnector  # (it imports this module's parts)

        return RabbitAsyncConnector(self)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                close_quietly(self._conn)
            self._conn = None
            sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()


# -- producer (kew_rabbitmq._producer), consumer (kew_rabbitmq._consumer, its
# settles: _outbox, _settle), browser (kew_rabbitmq._browser) ------------------


def connect(url: str) -> RabbitConnector:
    return RabbitConnector(url)
