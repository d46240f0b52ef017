"""Settling on the consumer's connection: acks, requeues, and settles
that wait for publisher confirms (state of the consumer's I/O thread).

Acks and requeues are plain frames on the consumer's channel: they take
effect when the broker reads them, nobody waits.  A settle with messages to
send (and a dead letter) publishes them on a second, confirm-mode channel
of the same connection and acks its deliveries once the broker has
confirmed every one of them (stored: a persistent message in a durable
queue).  Many settles may wait for confirms at once, so their round trips
overlap.  Not an AMQP transaction: RabbitMQ refuses any frame on a channel
while its tx.commit runs, so an ack written during a commit closed the
connection, and commits cannot overlap.  A crash between confirm and ack
delivers the message again: the same guarantee as send-then-ack.  Frames go
through the BlockingChannels' underlying channels: they are buffered, and
the I/O loop writes every frame of one flush at once.

A resize of the consumer's window (:func:`cancel_keeping`, :class:`Writes`)
cancels the consumer without giving back what it delivered: delivery tags
belong to the channel, and stay ackable after the cancel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pika
from pika.exceptions import AMQPConnectionError

from kew.qchan.spi import BrokerUnavailable
from kew_rabbitmq._connection import nothing

log = logging.getLogger("kew.consumer")


def write_ack(ch: Any, tag: int) -> None:
    ch._impl.basic_ack(tag)


def write_requeue(ch: Any, tag: int) -> None:
    ch._impl.basic_nack(tag, requeue=True)


Write = Callable[[Any, int], None]


def cancel_keeping(conn: Any, ch: Any, tag: str, check: Callable[[], None]) -> None:
    """basic.cancel of consumer ``tag``, waited for (``check`` raises to
    give up).  Not pika's basic_cancel, which rejects (requeues) what comes
    for the consumer before the cancel-ok: here it goes to the consumer's
    callback as before."""
    ok: list[bool] = []

    def on_ok(_frame: Any) -> None:
        ok.append(True)
        conn.add_callback_threadsafe(nothing)  # process_data_events returns

    cancel = pika.spec.Basic.Cancel(consumer_tag=tag)
    ch._impl._rpc(cancel, on_ok, [(pika.spec.Basic.CancelOk, {"consumer_tag": tag})])
    deadline = time.monotonic() + 30
    while not ok:
        check()
        if time.monotonic() > deadline:
            raise AMQPConnectionError("no basic.cancel-ok in time")
        conn.process_data_events(time_limit=0.2)
    # That call dispatched every delivery that came before the cancel-ok, and
    # none comes after it: forget the consumer, as pika's basic_cancel does.
    ch._impl._consumers.pop(tag, None)
    ch._consumer_infos.pop(tag, None)


class Writes:
    """Acks and requeues on the consumer's channel (I/O thread state, one
    per connection), and how many deliveries of the current consumer the
    broker counts unsettled.  A quorum queue gives back to the queue what
    it sent a consumer that reaches the channel after its cancel (marked
    redelivered, ``x-delivery-count`` + 1: rabbitmq-server #3729), i.e. the
    deliveries that acks just before made room for: so a resize there
    holds the acks until the consumer has no credit left (:meth:`drain`)."""

    __slots__ = ("first", "held", "last", "unsettled")

    def __init__(self) -> None:
        self.first = self.last = 0  # the current consumer's first tag; the last tag
        self.unsettled = 0  # of the current consumer, as the broker counts them
        self.held: list[tuple[Write, int]] | None = None  # while holding

    def delivered(self, tag: int) -> None:
        self.last = tag
        self.unsettled += tag >= self.first

    def consumed(self) -> None:
        """A new consumer: its deliveries come after every one so far."""
        self.first, self.unsettled = self.last + 1, 0

    def write(self, ch: Any, op: Write, tag: int) -> None:
        if self.held is not None:
            self.held.append((op, tag))
            return
        op(ch, tag)
        self.unsettled -= tag >= self.first

    def drain(self, conn: Any, ch: Any, queue: str, window: int, quiet: float) -> None:
        """Hold the acks until the consumer holds its whole ``window`` (no
        credit left: nothing on its way).  An empty queue has nothing on its
        way (what it sent before it said so reaches the channel before the
        cancel).  One with the messages to fill the window is waited for
        while they come (a busy quorum queue is slow; a competing consumer
        may take them): until none came for ten times ``quiet`` seconds.
        One with fewer: until none came for ``quiet`` (one sent meanwhile
        may still be returned)."""
        self.held = []
        need = window - self.unsettled
        ready = ch.queue_declare(queue, passive=True).method.message_count if need > 0 else 0
        if ready == 0:
            return
        quiet *= 10 if ready >= need else 1
        start = last = time.monotonic()
        seen = self.unsettled
        while self.unsettled < window:
            now = time.monotonic()
            if self.unsettled != seen:
                seen, last = self.unsettled, now
            elif now - last >= quiet or now - start >= 5 * quiet:
                return
            conn.process_data_events(time_limit=quiet)

    def release(self, ch: Any) -> None:
        """Write what was held (nothing when the connection was lost)."""
        held, self.held = self.held, None
        for op, tag in held or ():
            self.write(ch, op, tag)


#: An op for the I/O thread: (connection generation, fn(channel)).
Op = tuple[int, Callable[[Any], None]]

Done = Callable[[BaseException | None], None]


class Settle:
    """A settle waiting for its publisher confirms (I/O thread state)."""

    __slots__ = ("done", "error", "finished", "ids", "pending", "tags")

    def __init__(self, tags: list[int], ids: list[str], done: Done) -> None:
        self.tags = tags
        self.ids = ids
        self.pending = len(ids)
        self.error = ""
        self.done = done
        self.finished = False

    def finish(self, error: str, url: str, queue: str) -> None:
        """Once: record the outcome and call back."""
        if self.finished:
            return
        self.finished = True
        self.error = self.error or error
        try:
            self.done(settle_error(url, queue, self.error) if self.error else None)
        except Exception:
            log.exception("kew: a settle callback failed")


def settle_error(url: str, queue: str, why: str) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"settling on {queue!r} at {url}: {why}; what was not acked is delivered again"
    )
