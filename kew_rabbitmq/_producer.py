"""The producer: publisher confirms; batches pipelined or in one transaction.

``send`` publishes on a confirm-mode channel and waits for its confirm.
``send_many`` writes the whole batch on a confirm-mode channel without
waiting, then waits once for all its confirms (:class:`Pipeline`,
``batch=pipeline``), or publishes it in one AMQP transaction (``batch=tx``:
commit-ok once every message is stored).  ``send_to`` (the connector's
``MultiSender``, through a producer of its own) does the same for messages
bound for several queues: one round trip for all.  A producer's connection is its
own, guarded by a lock, opened at the first send (and again after it is
lost, or in a child made by fork).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelClosedByBroker

from kew.qchan.spi import AccessRefused, BrokerUnavailable, Message, MessageTooLarge, SendError
from kew_rabbitmq._connection import (
    close_quietly,
    coalesce,
    nothing,
    open_connection,
    reset_in_child,
)
from kew_rabbitmq._envelope import delay_arguments, delay_route, properties

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector


class RabbitProducer:
    def __init__(self, connector: RabbitConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._label = repr(queue)  # what errors name: the queue (or queues, for send_to)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: Any = None  # a pika.BlockingConnection, opened at the first send
        self._confirm: Any = None  # a channel in confirm mode, for send
        self._tx: Any = None  # a channel in transaction mode, for send_many
        self._pipe: Pipeline | None = None  # or one with pipelined confirms
        reset_in_child(self)

    def _in_child(self) -> None:
        """After os.fork, in the child: the parent's connection is left
        alone (the next send opens this process's own), and the lock the
        parent's threads may have held is new."""
        self._lock = threading.Lock()
        self._drop()

    def _drop(self) -> None:
        self._pid = os.getpid()
        self._conn = self._confirm = self._tx = self._pipe = None

    def _channels(self) -> tuple[Any, Any]:
        if self._pid != os.getpid():
            self._drop()
        if self._conn is None or not self._conn.is_open:
            self._conn = open_connection(self._c.options)
            self._confirm = self._tx = self._pipe = None
            self._c.delay_queues.clear()  # declared again on this connection
        if self._confirm is None or not self._confirm.is_open:
            self._confirm = self._conn.channel()
            self._confirm.confirm_delivery()
        return self._confirm, self._conn

    def _batch_channel(self) -> Any:
        assert self._conn is not None
        if self._c.options.batch == "tx":
            if self._tx is None or not self._tx.is_open:
                self._tx = self._conn.channel()
                self._tx.tx_select()
            return self._tx
        if self._pipe is None or not self._pipe.channel.is_open:
            self._pipe = Pipeline(self._conn)
        return self._pipe

    def _route(self, ch: Any, queue: str, m: Message) -> str:
        """The queue to publish to: ``queue``, or a delay queue feeding it."""
        if len(m.body) > self._c.max_message_size:
            raise MessageTooLarge(len(m.body), self._c.max_message_size, queue)
        route = delay_route(queue, m, self._c.options.delay_granularity)
        if route is None:
            return queue
        if self._c.delay_due(route):
            ch.queue_declare(route.queue, durable=True, arguments=delay_arguments(route))
        return route.queue

    def _with_retry(self, fn: Callable[[Any, Any], None], label: str = "") -> None:
        # fn(confirm channel, connection); errors name ``label`` (default: the queue)
        label = label or self._label
        with self._lock:
            for attempt in (1, 2):
                try:
                    fn(*self._channels())
                    return
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as e:
                    raise SendError(f"RabbitMQ refused a message for {label}: {e!r}") from None
                except ChannelClosedByBroker as e:
                    if e.reply_code == 403:
                        raise AccessRefused(
                            f"RabbitMQ at {self._c.url} refused user "
                            f"{self._c.options.username!r} the permission to send to "
                            f"{label}: ({e.reply_code}) {e.reply_text}"
                        ) from e
                    self._lose(attempt, e, label)
                except (AMQPConnectionError, AMQPChannelError) as e:
                    self._lose(attempt, e, label)

    def _lose(self, attempt: int, e: Exception, label: str) -> None:
        close_quietly(self._conn)
        self._conn = None  # reconnect and send again: at-least-once
        if attempt == 2:
            raise BrokerUnavailable(f"sending to {label} at {self._c.url} failed: {e!r}") from None

    def send(self, message: Message) -> None:
        def publish(confirm: Any, _conn: Any) -> None:
            route = self._route(confirm, self._queue, message)
            confirm.basic_publish("", route, message.body, properties(message), mandatory=True)

        self._with_retry(publish)

    def send_many(self, messages: Sequence[Message]) -> None:
        self._publish_all([(self._queue, m) for m in messages])

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """Each message to its own queue, in one batch (see ``send_many``)."""
        for queue, m in sends:  # all checked before anything is written
            if len(m.body) > self._c.max_message_size:
                raise MessageTooLarge(len(m.body), self._c.max_message_size, queue)
        self._publish_all(sends, ", ".join(repr(q) for q in dict.fromkeys(q for q, _ in sends)))

    def _publish_all(self, sends: Sequence[tuple[str, Message]], label: str = "") -> None:
        label = label or self._label

        def publish(confirm: Any, _conn: Any) -> None:
            routes = [self._route(confirm, q, m) for q, m in sends]  # all checked first
            batch = self._batch_channel()
            if isinstance(batch, Pipeline):
                batch.publish(label, list(zip(routes, (m for _, m in sends), strict=True)))
                return
            for route, (_, m) in zip(routes, sends, strict=True):
                batch._impl.basic_publish("", route, m.body, properties(m))  # buffered
            coalesce(self._conn)
            batch.tx_commit()  # one round trip: commit-ok once all are stored

        self._with_retry(publish, label)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                close_quietly(self._conn)
            self._conn = None


class Pipeline:
    """A confirm-mode channel whose publishes do not wait one by one: a
    batch is written in one go, then its confirms are awaited together
    (the broker confirms a persistent message once it is stored).
    BlockingChannel waits for each confirm, so this drives the channel
    underneath it; the producer's lock makes it single-threaded."""

    TIMEOUT = 120.0

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        # BlockingConnection's own wait (as BlockingChannel's): it processes I/O
        # until a condition holds, so a confirm needs no wake-up callback (a
        # socket write and a poll more per batch: 450 to 300 us of CPU per
        # submit).  Without it (another pika), process_data_events and wake-ups.
        self._flush: Callable[..., None] | None = getattr(conn, "_flush_output", None)
        self.channel = conn.channel()
        self._impl = self.channel._impl
        self._seq = 0  # delivery tags given so far on this channel
        self._waiting: set[int] = set()
        self._nacked: list[int] = []
        self._returned: list[str] = []
        ready: list[bool] = []
        self._impl.add_on_return_callback(self._on_return)

        def on_ready(_: Any) -> None:
            ready.append(True)
            if self._flush is None:
                self._wake()

        self._impl.confirm_delivery(self._on_confirm, callback=on_ready)
        self._wait(lambda: bool(ready))

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        done = {t for t in self._waiting if t <= m.delivery_tag} if m.multiple else {m.delivery_tag}
        if isinstance(m, pika.spec.Basic.Nack):
            self._nacked += sorted(done & self._waiting)
        self._waiting -= done
        if not self._waiting and self._flush is None:
            self._wake()

    def _wake(self) -> None:
        self.conn.add_callback_threadsafe(nothing)

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        self._returned.append(f"{props.message_id} ({method.reply_text})")

    def _wait(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.TIMEOUT

        def late() -> bool:
            return time.monotonic() > deadline

        if self._flush is not None:
            self._flush(done, late)  # raises if the connection closes
        while not done():
            if late():
                raise AMQPConnectionError("no publisher confirms in time")
            self.conn.process_data_events(time_limit=1)

    def publish(self, label: str, batch: Sequence[tuple[str, Message]]) -> None:
        """Publish ``(route, message)`` pairs, then wait for all their
        confirms; a nack or a return raises SendError naming ``label``."""
        self._nacked, self._returned = [], []
        for route, m in batch:
            self._impl.basic_publish("", route, m.body, properties(m), mandatory=True)
            self._seq += 1
            self._waiting.add(self._seq)
        coalesce(self.conn)
        self._wait(lambda: not self._waiting)
        if self._nacked or self._returned:
            raise SendError(
                f"RabbitMQ refused {len(self._nacked) + len(self._returned)} of "
                f"{len(batch)} messages for {label}: "
                f"{', '.join(self._returned) or 'nacked'}"
            )
