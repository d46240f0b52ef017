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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kew.qchan.spi import BrokerUnavailable

log = logging.getLogger("kew.consumer")


def write_ack(ch: Any, tag: int) -> None:
    ch._impl.basic_ack(tag)


def write_requeue(ch: Any, tag: int) -> None:
    ch._impl.basic_nack(tag, requeue=True)


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
