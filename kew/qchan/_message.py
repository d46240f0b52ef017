"""The pure half of a queue, no I/O, shared by :class:`kew.Queue` and
:mod:`kew.aio`: names, codecs, kew's message for a value (its wire-format
headers, docs/wire-format.md), the schedule of a delivery, and the check that
refuses an ``async def`` where a plain callable runs."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from typing import TypeVar

from kew.core.msg import CountedSchedule, FutureTimepoint
from kew.qchan.codec import Codec, DecodeError, make_codec
from kew.qchan.spi import Delivery, KewError, Message, MessageTooLarge, now_ms

T = TypeVar("T")

# Wire-format header names (docs/wire-format.md).
H_CONTENT_TYPE = "content-type"
H_TYPE = "kew-type"
H_SENT_AT = "kew-sent-at"
H_DELIVER_AT = "kew-deliver-at"
H_COUNT = "kew-count"

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

#: A message delivered this many times without being settled (its consumer
#: keeps dying on it) goes to the dead letters instead of being retried.
DEFAULT_MAX_DELIVERIES = 10


class InvalidValue(KewError, TypeError):
    """A value sent to a queue is not of the queue's type: nothing was
    stored.  The message names the queue and msgspec's path
    (``Expected `int`, got `str` - at `$.n```)."""


def check_sync(handler: object, what: str) -> None:
    """Refuse an ``async def`` (or an object whose ``__call__`` is one)
    where a plain callable is run: its coroutine would never be awaited,
    and the message would be acked without the work done."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - the attribute, not callable()
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call):
        name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
        raise TypeError(
            f"{what} {name} is an async function: the sync API calls it and would never "
            "await its coroutine; pass a plain function"
        )


def _iso(epoch_ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def new_id() -> str:
    """A random 128-bit message id, as 32 hex digits."""
    return os.urandom(16).hex()


def check_queue_name(name: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise ValueError(
            f"invalid queue name {name!r}: use 1-200 letters, digits, '_', '.', '-', "
            "not starting with '.' or '-'"
        )
    return name


def queue_codecs(
    name: str,
    tp: type[T],
    codec: str | Codec[T] = "json",
    encryption_keys: str | Mapping[str, bytes] | None = None,
) -> tuple[Codec[T], Codec[T]]:
    """A queue's codecs, ``(plain, wire)``: values are checked with the plain
    one; bodies travel in the wire one (the plain one, or with
    ``encryption_keys`` the same encrypted, see kew.qchan.crypto)."""
    plain = make_codec(tp, codec)
    if encryption_keys is None:
        return plain, plain
    from kew.qchan.crypto import EncryptedCodec

    return plain, EncryptedCodec(plain, encryption_keys, context=name)


def encode_checked(queue: str, plain: Codec[T], wire: Codec[T], data: T) -> bytes:
    """The body for ``data``, checked against the queue's type first (the
    design promises validation on both ends): a value that would only fail
    later, as a dead letter on the consumer, raises :class:`InvalidValue`
    here, naming ``queue``, and nothing is stored."""
    try:
        body = plain.encode(data)
        plain.decode(body)
    except DecodeError as e:
        raise InvalidValue(f"cannot send to queue {queue!r}: {e}") from None
    except (TypeError, ValueError) as e:  # msgspec.EncodeError, unsupported types
        raise InvalidValue(f"cannot send to queue {queue!r}: {type(e).__name__}: {e}") from None
    return body if plain is wire else wire.encode(data)


def make_message(
    queue: str,
    body: bytes,
    *,
    content_type: str,
    type_label: str,
    max_size: int,
    durable: bool = True,
    deliver_at: int | None = None,
    count: int = 1,
    id: str | None = None,
    sent_at: int | None = None,
) -> Message:
    """kew's message for an encoded ``body`` (docs/wire-format.md): its size
    checked against ``max_size`` (:class:`MessageTooLarge`), the headers
    ``content-type``, ``kew-type``, ``kew-sent-at`` (``sent_at``, else now),
    and ``kew-count`` / ``kew-deliver-at`` when not the default; ``id`` or a
    new random one."""
    if len(body) > max_size:
        raise MessageTooLarge(len(body), max_size, queue)
    headers: dict[str, str | int] = {
        H_CONTENT_TYPE: content_type,
        H_TYPE: type_label,
        H_SENT_AT: now_ms() if sent_at is None else sent_at,
    }
    if count != 1:
        headers[H_COUNT] = count
    if deliver_at is not None:
        headers[H_DELIVER_AT] = deliver_at
    return Message(id or new_id(), body, headers, durable, deliver_at)


def delivery_schedule(delivery: Delivery) -> CountedSchedule:
    """A delivery's schedule from its headers: when it was due and its
    ``kew-count`` (1 for a first delivery).  Raises kew.DecodeError when
    those headers are not integers (or the count is below 1)."""
    h = delivery.message.headers
    when = h.get(H_DELIVER_AT) or h.get(H_SENT_AT) or now_ms()
    count = h.get(H_COUNT, 1)
    if not isinstance(when, int) or not isinstance(count, int) or count < 1:
        raise DecodeError(
            f"bad schedule headers: {H_DELIVER_AT}/{H_SENT_AT}={when!r}, {H_COUNT}={count!r}"
        )
    return CountedSchedule(FutureTimepoint(when), count)
