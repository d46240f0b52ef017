"""kew's messages in AMQP properties, both ways (docs/wire-format.md,
"RabbitMQ"), and where a message is published (its delay queue).

Anything an AMQP client can put in a message's properties reaches the
readers here; none of them raises for it.  A message kew cannot read (see
:mod:`kew.qchan.spi.wire`) is dead-lettered by the consumer with the reason,
as much of it kept as can be (:func:`read`); the browser lists, requeues and
purges such messages like any other (:func:`dead_letter`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pika

from kew.qchan.spi import DeadLetter, Headers, Message, now_ms
from kew.qchan.spi.kit import DelayRoute, ttl_delay_route
from kew.qchan.spi.wire import (
    H_CONTENT_TYPE,
    H_DEAD_AT,
    H_DEAD_COUNT,
    H_DEAD_REASON,
    Malformed,
    check_id,
    check_kew_headers,
    header_value,
    headers_from_mapping,
    salvage,
)

log = logging.getLogger("kew.consumer")

#: Dead-letter headers (next to the message's own, on messages in <q>.dead).
DEAD_HEADERS = (H_DEAD_REASON, H_DEAD_COUNT, H_DEAD_AT)


# -- writing -------------------------------------------------------------------


def properties(m: Message) -> pika.BasicProperties:
    """The AMQP properties of ``m``: the id in ``message_id``, the headers
    in the headers table, and the content type in AMQP's property too, for
    other programs (none if the message has none; read back, the property
    becomes the header)."""
    content_type = m.headers.get(H_CONTENT_TYPE)
    if not isinstance(content_type, str) or len(content_type.encode()) > 255:
        content_type = None  # not a short string: in the headers only
    return pika.BasicProperties(
        message_id=m.id,
        headers=dict(m.headers),
        delivery_mode=2 if m.durable else 1,
        content_type=content_type,
    )


def delay_route(queue: str, m: Message, granularity: int) -> DelayRoute | None:
    """The delay queue for ``m`` (``<queue>.delay.<D>``), or None to publish
    to ``queue`` now (kew.qchan.spi.kit: delays rounded up, never early)."""
    return ttl_delay_route(queue, m.deliver_at, granularity, now_ms())


def delay_arguments(route: DelayRoute) -> dict[str, Any]:
    """A delay queue's declare arguments: its messages expire after the
    delay into the target queue, and the queue itself when unused."""
    return {
        "x-message-ttl": route.ttl,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": route.target,
        "x-expires": route.expires,
    }


# A content header frame: 8 bytes of frame, 12 of class, weight and body size,
# then the properties.  The broker closes a connection that sends a frame over
# its frame_max; a dead letter that did that would come back for ever.
_FRAME_OVERHEAD = 20


def _header_size(name: str, value: str | int) -> int:
    """What one header costs in an AMQP table (pika's encoding)."""
    return 1 + len(name.encode()) + (9 if isinstance(value, int) else 5 + len(value.encode()))


def fit(m: Message, frame_max: int) -> Message:
    """The dead letter ``m``, made to fit one AMQP frame: its largest headers
    left out, then its reason cut, the reason saying so."""
    size = len(b"".join(properties(m).encode())) + _FRAME_OVERHEAD
    if size <= frame_max:
        return m
    headers = dict(m.headers)
    reason = str(headers.pop(H_DEAD_REASON, ""))
    size -= _header_size(H_DEAD_REASON, reason)
    left_out: list[str] = []
    room = frame_max - 1024  # for the reason
    # the largest first, the content type last
    for name in sorted(headers, key=lambda k: (k == H_CONTENT_TYPE, -_header_size(k, headers[k]))):
        if size <= room:
            break
        if name not in DEAD_HEADERS:
            size -= _header_size(name, headers.pop(name))
            left_out.append(name)
    note = f" [left out to fit one AMQP frame: headers {', '.join(left_out)}"[:300] + "]"
    cut = max(0, frame_max - size - len(note.encode()) - _header_size(H_DEAD_REASON, "") - 64)
    headers[H_DEAD_REASON] = reason.encode()[:cut].decode(errors="ignore") + note
    return Message(m.id, m.body, headers, m.durable, m.deliver_at)


# -- reading what another program wrote ------------------------------------------


def _own_headers(props: Any) -> dict[Any, object]:
    """The message's header table without the broker's own headers (names
    starting ``x-``: ``x-death``, ``x-delivery-count``, ...)."""
    table = props.headers
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if not (isinstance(k, str) and k.startswith("x-"))}


_INT = (int, pika.compat.long)  # the integer types pika's decoder makes
_INT_MIN, _INT_END = -(2**63), 2**63  # (not a range: ``in`` scans it for an int subclass)


def _plain_headers(table: dict[Any, object]) -> dict[str, str | int] | None:
    """The fast path of :func:`_message` (every message kew wrote): the
    header table with text names and values text or 64-bit integers, kew's
    own and the broker's left out; None if it has anything else (the full
    checks then say what)."""
    out: dict[str, str | int] = {}
    for name, value in table.items():
        if type(name) is not str:
            return None
        if name.startswith("x-") or name in DEAD_HEADERS:
            continue
        if isinstance(value, str) and type(value) is str:
            out[name] = value
        elif isinstance(value, int) and type(value) in _INT and _INT_MIN <= value < _INT_END:
            out[name] = int(value)
        else:
            return None
    check_kew_headers(out)
    return out


def _message(props: Any, body: bytes) -> Message:
    """The message, or :class:`Malformed` saying what kew cannot read.
    kew's dead-letter headers are not part of it (the browser reads them)."""
    mid = check_id(props.message_id)
    table = props.headers
    headers = _plain_headers(table) if type(table) is dict else None
    if headers is None:
        headers = _plain(headers_from_mapping(_own_headers(props), skip=DEAD_HEADERS), True)
    if props.content_type is not None:  # AMQP's own property, for a foreign producer
        headers[H_CONTENT_TYPE] = header_value(H_CONTENT_TYPE, props.content_type)
    return Message(mid, body, headers)


def _plain(headers: Headers, strict: bool) -> dict[str, str | int]:
    """Integers as ints (pika decodes them as its own ``long(int)``), and
    only those AMQP can carry: an integer beyond 64 bits comes from an AMQP
    double, which pika reads as an integer; kew could not write it back.
    ``strict``: Malformed for one, else it is left out."""
    out: dict[str, str | int] = {}
    for name, value in headers.items():
        if isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                if strict:
                    raise Malformed(
                        f"header {name!r} holds a number beyond the 64-bit integers of AMQP "
                        f"({str(value)[:30]}...); kew header values are text or integers"
                    )
                continue
            value = int(value)
        out[name] = value
    return out


def read(props: Any, body: bytes) -> tuple[Message, str]:
    """``(message, "")``; or, for a message kew cannot read, what can be
    kept of it and why (``malformed envelope: ...``)."""
    try:
        return _message(props, body), ""
    except Malformed as e:
        why = str(e)
    except Exception as e:  # a bug of kew's: that one message goes, not the consumer
        log.exception("kew: cannot read a message's envelope")
        why = str(Malformed(f"kew cannot read it ({type(e).__name__}: {e})"))
    headers = {k: v for k, v in _own_headers(props).items() if k not in DEAD_HEADERS}
    if props.content_type is not None:
        headers[H_CONTENT_TYPE] = props.content_type
    kept = salvage(props.message_id, body, headers, fallback_id=_fallback_id(props, body))
    return Message(kept.id, kept.body, _plain(kept.headers, strict=False)), why


def _fallback_id(props: Any, body: bytes) -> str:
    """An id for a message without a usable one: a digest of what its
    producer wrote (not of what the broker adds), so that every reading of
    it gives the same id: a listing, then a requeue by that id."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((props.message_id, props.content_type, _own_headers(props))).encode())
    digest.update(body)
    return digest.hexdigest()


def delivery_count(props: Any, redelivered: bool, quorum: bool) -> int:
    """1 for a first delivery; on a redelivery the quorum queue's
    ``x-delivery-count`` + 1, else 2.  The header is read only where the
    broker sets it (quorum queues, redeliveries): one that a producer wrote
    (copied from another message, or not a number) says nothing."""
    if not redelivered:
        return 1
    table = props.headers
    count = table.get("x-delivery-count") if quorum and isinstance(table, dict) else None
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return count + 1
    return 2


def _int_or(value: object, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def dead_letter(props: Any, body: bytes) -> DeadLetter:
    """A message of ``<q>.dead`` as a dead letter, whoever wrote it: what
    cannot be read is left out (a count of 1, a time of 0, the problem as
    the reason when there is none)."""
    message, why = read(props, body)
    table = props.headers if isinstance(props.headers, dict) else {}
    try:
        reason = str(header_value(H_DEAD_REASON, table.get(H_DEAD_REASON, why)))
    except Malformed as e:
        reason = why or str(e)
    count = _int_or(table.get(H_DEAD_COUNT), 1)
    return DeadLetter(message, count, reason, _int_or(table.get(H_DEAD_AT), 0))
