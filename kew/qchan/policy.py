"""Per-delivery policy, in one place for plain queues, task queues and
:mod:`kew.aio`.

Before any handler runs, a delivery is *admitted*: a message delivered
more than ``max_deliveries`` times without being settled (its consumer
keeps dying on it) goes to the dead letters, and so does a body that does
not decode as the queue's type (with msgspec's reason, and the content
type it was sent with when that differs from the queue's).  What a handler
raises, and how that is logged, is the caller's policy (a sink
dead-letters, a repeat sink or a task retries); :meth:`DeliveryPolicy.failure`
is a sink's.

The decisions are pure (:meth:`DeliveryPolicy.judge`, :meth:`DeliveryPolicy.failure`
do no I/O); :meth:`~DeliveryPolicy.admit` settles through a sync consumer and
:meth:`~DeliveryPolicy.admit_async` through an async one, so that both APIs
dead-letter with the same reasons and log the same lines.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

from kew.qchan.codec import Codec, DecodeError
from kew.qchan.spi import Consumer, Delivery
from kew.qchan.spi.aio import AsyncConsumer
from kew.qchan.spi.wire import H_CONTENT_TYPE

__all__ = ["DeliveryPolicy", "failure_text", "log_failure"]

T = TypeVar("T")

log = logging.getLogger("kew")


def failure_text(error: BaseException) -> str:
    """A dead letter's reason for a handler's exception: type, message and
    the last frames of the traceback."""
    tb = "".join(traceback.format_exception(error, limit=-8))
    return f"{type(error).__name__}: {error}\n{tb}"


def log_failure(level: int, message: str, *args: object, error: BaseException | None) -> None:
    """One log line for a failure; its traceback only when DEBUG is on."""
    debug = error is not None and log.isEnabledFor(logging.DEBUG)
    log.log(level, message, *args, exc_info=error if debug else None)


class DeliveryPolicy(Generic[T]):
    """Admits deliveries of one queue: the poison cap, then the decode."""

    def __init__(self, queue: str, codec: Codec[T], type_label: str, max_deliveries: int) -> None:
        self.queue = queue
        self.codec = codec
        self.type_label = type_label
        self.max_deliveries = max_deliveries

    def judge(
        self, delivery: Delivery, decode: Callable[[bytes], T] | None = None
    ) -> tuple[T] | str:
        """The decision, without I/O: ``(value,)``, or the reason (a str) the
        delivery must go to the dead letters with."""
        if delivery.delivery_count > self.max_deliveries:
            return (
                f"delivered {delivery.delivery_count} times without being settled "
                f"(more than max_deliveries={self.max_deliveries}): its consumer may crash on it"
            )
        try:
            return ((decode or self.codec.decode)(delivery.message.body),)
        except DecodeError as e:
            return f"cannot decode as {self.type_label}: {e}{self.sent_as(delivery)}"

    def admit(
        self, consumer: Consumer, delivery: Delivery, decode: Callable[[bytes], T] | None = None
    ) -> tuple[T] | None:
        """``(value,)``, or None when the delivery was dead-lettered here
        (with the reason, logged at WARNING)."""
        verdict = self.judge(delivery, decode)
        if isinstance(verdict, str):
            self._log_dead(delivery, verdict)
            consumer.dead_letter(delivery, verdict)
            return None
        return verdict

    async def admit_async(
        self,
        consumer: AsyncConsumer,
        delivery: Delivery,
        decode: Callable[[bytes], T] | None = None,
    ) -> tuple[T] | None:
        """:meth:`admit` through an async consumer."""
        verdict = self.judge(delivery, decode)
        if isinstance(verdict, str):
            self._log_dead(delivery, verdict)
            await consumer.dead_letter(delivery, verdict)
            return None
        return verdict

    def failure(self, delivery: Delivery, error: Exception) -> str:
        """What a sink does when its handler raised ``error``: logs it (a
        :class:`DecodeError` at WARNING, anything else once at ERROR, the
        traceback at DEBUG) and returns the dead letter's reason."""
        if isinstance(error, DecodeError):
            log.warning(
                "kew: %s: message %s goes to the dead letters: cannot decode: %s",
                self.queue,
                delivery.message.id,
                error,
            )
            return f"cannot decode: {error}"
        log_failure(
            logging.ERROR,
            "kew: %s: handler failed on message %s (delivery %d); "
            "it goes to the dead letters: %s: %s",
            self.queue,
            delivery.message.id,
            delivery.delivery_count,
            type(error).__name__,
            error,
            error=error,
        )
        return failure_text(error)

    def sent_as(self, delivery: Delivery) -> str:
        """For a body that did not decode: a note when it was sent with
        another content type (kew decodes with the queue's codec whatever the
        header says, docs/wire-format.md)."""
        sent = delivery.message.headers.get(H_CONTENT_TYPE)
        mine = self.codec.content_type
        if not isinstance(sent, str) or sent.split(";")[0].strip().lower() == mine:
            return ""
        return f" (sent as {sent[:80]!r}; queue {self.queue!r} reads {mine})"

    def _log_dead(self, delivery: Delivery, reason: str) -> None:
        log.warning(
            "kew: %s: message %s goes to the dead letters: %s",
            self.queue,
            delivery.message.id,
            reason,
        )
