"""The consumer's outbox: messages a settle publishes on the consumer's own
connection, its deliveries acked once the broker confirmed every one.

One per consumer, state of its I/O thread (:mod:`kew_rabbitmq._consumer`):
a second channel of the connection in confirm mode, the settles waiting for
their confirms there (many at once, so their round trips overlap), and what
the broker could not route (a ``basic.return`` comes before the message's
confirm).  A settle whose messages were all confirmed has its deliveries
acked (requeued if one was refused or returned) on the consumer's channel,
then its callback called; one whose connection is lost fails, and the broker
delivers its deliveries again.  The protocol itself (why confirms, not a
transaction) is in :mod:`kew_rabbitmq._settle`.  Also the dead letter a
delivery becomes (:meth:`Outbox.dead_send`): it is settled like any other.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import AMQPConnectionError

from kew.qchan.spi import Delivery, Message, now_ms
from kew.qchan.spi.wire import H_DEAD_AT, H_DEAD_COUNT, H_DEAD_REASON
from kew_rabbitmq._connection import coalesce, nothing
from kew_rabbitmq._envelope import delay_arguments, delay_route, fit, properties
from kew_rabbitmq._settle import Settle, Write, write_ack, write_requeue

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector


class Outbox:
    """The confirm channel of a consumer's connection and the settles
    waiting on it.  ``write(op, tag)`` acks or requeues a delivery on the
    consumer's channel; ``lock`` (the consumer's) guards :attr:`open`."""

    def __init__(
        self,
        connector: RabbitConnector,
        queue: str,
        lock: threading.Lock,
        write: Callable[[Write, int], None],
    ) -> None:
        self._c = connector
        self._queue = queue
        self.lock = lock
        self._write = write
        self.open: set[Settle] = set()  # settles not finished (under lock)
        self._conn: Any = None  # the connection (a pika.BlockingConnection)
        self._pub: Any = None  # its confirm-mode channel (a BlockingChannel)
        self._seq = 0  # messages published on it so far
        self._unconfirmed: collections.deque[tuple[int, Settle]] = collections.deque()
        self._returned: set[str] = set()  # ids of messages the broker could not route
        #: The largest frame the broker takes (negotiated when connected).
        self.frame_max = 131_072

    def connect(self, conn: Any) -> None:
        """A channel in confirm mode on a new connection, whose confirms and
        returns come to this thread (what waited on the last one is void)."""
        pub = conn.channel()
        ready: list[bool] = []

        def on_ready(_: Any) -> None:
            ready.append(True)
            # process_data_events returns early only for its own events, not
            # for this callback of the channel underneath: without a wake-up
            # it would sleep out its time limit before the first delivery
            conn.add_callback_threadsafe(nothing)

        pub._impl.add_on_return_callback(self._on_return)
        pub._impl.confirm_delivery(self._on_confirm, callback=on_ready)
        deadline = time.monotonic() + 30
        while not ready:
            if time.monotonic() > deadline:
                raise AMQPConnectionError("no confirm.select-ok in time")
            conn.process_data_events(time_limit=0.2)
        self._conn, self._pub, self._seq = conn, pub, 0
        self._unconfirmed.clear()
        self._returned.clear()
        self.frame_max = int(getattr(conn._impl.params, "frame_max", 0)) or 131_072

    @property
    def waiting(self) -> bool:
        """Whether messages published wait for their confirms."""
        return bool(self._unconfirmed)

    def lost(self) -> None:
        """The connection is gone: no confirm comes for what waits."""
        self._unconfirmed.clear()
        self._conn = None

    def publish(self, entry: Settle, sends: Sequence[tuple[str, Message]]) -> None:
        """On the I/O thread: publish ``entry``'s messages (each to its
        queue, or to the delay queue feeding it), not waiting."""
        pub = self._pub._impl
        for queue, m in sends:
            route = delay_route(queue, m, self._c.options.delay_granularity)
            target = queue if route is None else route.queue
            if route is not None and self._c.delay_due(route):
                pub.queue_declare(route.queue, durable=True, arguments=delay_arguments(route))
            pub.basic_publish("", target, m.body, properties(m), mandatory=True)
            self._seq += 1
            self._unconfirmed.append((self._seq, entry))

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        refused = isinstance(m, pika.spec.Basic.Nack)
        confirmed = self._unconfirmed
        if m.multiple:
            while confirmed and confirmed[0][0] <= m.delivery_tag:
                self._confirmed(confirmed.popleft()[1], refused)
        else:
            for i, (seq, entry) in enumerate(confirmed):
                if seq == m.delivery_tag:
                    del confirmed[i]
                    self._confirmed(entry, refused)
                    break
        if self._conn is not None:
            coalesce(self._conn)  # the acks written: one send() for them all

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        # a basic.return comes before the message's confirm
        self._returned.add(f"{props.message_id} to {method.routing_key!r} ({method.reply_text})")

    def _confirmed(self, entry: Settle, refused: bool) -> None:
        if refused:
            entry.error = "the broker refused (nacked) a message"
        entry.pending -= 1
        if entry.pending:
            return
        returned = [r for r in self._returned if r.split(" ", 1)[0] in entry.ids]
        if returned:
            self._returned.difference_update(returned)
            entry.error = f"no queue for {', '.join(returned)}"
        for tag in entry.tags:  # stored: ack; else delivered again
            self._write(write_requeue if entry.error else write_ack, tag)
        self.finish(entry, "")

    def finish(self, entry: Settle, error: str) -> None:
        """``entry`` is done (``error``: why not)."""
        with self.lock:
            self.open.discard(entry)
        entry.finish(error, self._c.url, self._queue)

    def fail_open(self, why: str) -> None:
        """Every settle not finished fails (its deliveries come again)."""
        with self.lock:
            entries, self.open = list(self.open), set()
        for entry in entries:
            entry.finish(why, self._c.url, self._queue)

    def dead_send(self, delivery: Delivery, reason: str) -> tuple[str, Message]:
        """The dead letter of ``delivery`` (to ``<queue>.dead``, with why),
        made to fit one frame."""
        m = delivery.message
        headers = {
            **m.headers,
            H_DEAD_REASON: reason,
            H_DEAD_COUNT: delivery.delivery_count,
            H_DEAD_AT: now_ms(),
        }
        return f"{self._queue}.dead", fit(Message(m.id, m.body, headers), self.frame_max)
