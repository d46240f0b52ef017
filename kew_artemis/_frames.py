"""What kew_artemis puts in STOMP frames and reads back (pure, no broker):
SEND and SUBSCRIBE headers per dialect, and a MESSAGE frame read into a
:class:`~kew.qchan.spi.Message` through :mod:`kew.qchan.spi.wire` (the
wire format's names are that module's; this one adds STOMP's own)."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping

import msgspec

from kew.qchan.spi import Message, SendError
from kew.qchan.spi.kit import ttl_delay_route
from kew.qchan.spi.wire import (
    H_CONTENT_TYPE,
    H_COUNT,
    H_DEAD_AT,
    H_DEAD_COUNT,
    H_DELIVER_AT,
    H_SENT_AT,
    H_TYPE,
    INT_HEADERS,
    Malformed,
    check_id,
    check_kew_headers,
    describe,
    salvage,
)

# kew's own STOMP headers (the wire format's names are kew.qchan.spi.wire's).
H_ID = "kew-id"
H_INTS = "kew-ints"  # JSON list of the header names whose values are ints
H_REDELIVERIES = "kew-redeliveries"  # releases by kew (a copy is sent, then acked)
ESCAPE = "kew-h-"  # prefix for an application header whose name STOMP or a broker owns
#: The broker's own id of a frame (every STOMP broker sets it on MESSAGE).
H_BROKER_ID = "message-id"
#: Set by kew's frame reader on a frame whose headers are not UTF-8: why.
#: No header read from the wire has a ``:`` in its name, so none can forge it.
H_UNREADABLE = "kew:unreadable"

#: Header names a STOMP frame or one of the brokers gives a meaning of its own.
RESERVED = frozenset(
    {
        "ack", "content-length", "destination", "expires", "host", "id", "login",
        "message", "message-id", "passcode", "persistent", "priority", "receipt",
        "receipt-id", "redelivered", "reply-to", "subscription", "timestamp",
        "transaction", "type", "version", "heart-beat", "correlation-id", "browser",
        "destination-type", "subscription-type", "consumer-window-size", "selector",
        "original-destination",
        "scheduledjobid",  # ActiveMQ's scheduler, on what it delivers late
    }
)  # fmt: skip
#: Prefixes of headers brokers add or interpret (dropped on the way in, escaped on the way out).
BROKER_PREFIXES = ("amq_", "_amq", "jms", "activemq.", "x-", "__amq", "nms")


# -- frames kew writes -------------------------------------------------------


def destination(dialect: str, queue: str) -> str:
    """The STOMP destination of ``queue``: Artemis addresses the queue by
    name (anycast headers say it is a queue); the others use ``/queue/``."""
    return queue if dialect == "artemis" else f"/queue/{queue}"


#: kew's wire-format headers that travel under their own names.
PLAIN_KEW = frozenset({H_TYPE, H_SENT_AT, H_DELIVER_AT, H_COUNT})


def _wire_name(name: str) -> str:
    """A header's name on the wire: ``kew-h-<name>`` where STOMP, a broker
    or kew's STOMP provider itself owns the name."""
    lowered = name.lower()
    if lowered in RESERVED or lowered.startswith(BROKER_PREFIXES):
        return ESCAPE + name
    if lowered.startswith("kew-") and name not in PLAIN_KEW:
        return ESCAPE + name
    return name


def send_headers(
    dialect: str, message: Message, extra: Mapping[str, str | int] | None = None, *, now: int
) -> dict[str, str]:
    """The SEND frame's headers for ``message`` (without destination/receipt).

    Application headers keep their names (escaped with ``kew-h-`` where STOMP
    or a broker owns the name); int values travel as decimal text, listed
    in ``kew-ints`` so they come back as ints.  ``extra`` are kew's own
    headers (dead-letter reason ...), written as they are.
    """
    h: dict[str, str] = {H_ID: message.id, "persistent": "true" if message.durable else "false"}
    ints: list[str] = []
    for k, v in message.headers.items():
        if k == H_CONTENT_TYPE:
            h[k] = str(v)
            continue
        name = _wire_name(k)
        if isinstance(v, int) and not isinstance(v, bool):
            ints.append(name)
        h[name] = str(v)
    for k, v in (extra or {}).items():
        h[k] = str(v)
    if ints:
        h[H_INTS] = json.dumps(ints, separators=(",", ":"))
    if dialect == "artemis":
        h["destination-type"] = "ANYCAST"
    if message.deliver_at is not None and message.deliver_at > now:
        if dialect == "artemis":
            h["AMQ_SCHEDULED_TIME"] = str(message.deliver_at)
        elif dialect == "activemq":
            h["AMQ_SCHEDULED_DELAY"] = str(message.deliver_at - now)
        else:
            raise SendError(
                "RabbitMQ's STOMP plugin cannot schedule a message: route it with "
                "send_frame, which uses a TTL delay queue (kew never delivers one early)"
            )
    return h


def send_frame(
    dialect: str,
    queue: str,
    message: Message,
    *,
    now: int,
    granularity: int = 100,
    extra: Mapping[str, str | int] | None = None,
) -> tuple[str, dict[str, str]]:
    """(destination, headers) of the SEND frame that puts ``message`` on ``queue``.

    Artemis and ActiveMQ schedule with headers.  RabbitMQ has no scheduler:
    a message due in d ms goes to the durable queue ``<q>.delay.<D>`` (D = d
    rounded *up* to ``granularity``), declared by this very SEND with
    ``x-message-ttl=D`` and dead-lettering into ``<q>`` through the default
    exchange; the queue expires when unused.  Every message of a delay queue
    has the same TTL, so they expire in order, and never early.
    """
    route = ttl_delay_route(queue, message.deliver_at, granularity, now)
    if dialect != "rabbitmq" or route is None:
        return destination(dialect, queue), send_headers(dialect, message, extra, now=now)
    headers = send_headers(dialect, dataclasses.replace(message, deliver_at=None), extra, now=now)
    headers.update(
        {
            "x-message-ttl": str(route.ttl),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": route.target,
            "x-expires": str(route.expires),
        }
    )
    return destination(dialect, route.queue), headers


def subscribe_headers(dialect: str, prefetch: int, window_bytes: int = 1) -> dict[str, str]:
    """The SUBSCRIBE frame's extra headers: the prefetch bound per dialect."""
    if dialect == "artemis":
        return {
            "subscription-type": "ANYCAST",
            "consumer-window-size": str(max(1, prefetch * window_bytes)),
        }
    if dialect == "activemq":
        return {"activemq.prefetchSize": str(prefetch)}
    return {"prefetch-count": str(prefetch)}


# -- frames kew reads ----------------------------------------------------------

_DECIMAL = re.compile(r"-?[0-9]+")
_names = msgspec.json.Decoder(list[str])


def _listed_ints(raw: str | None) -> set[str]:
    """The header names ``kew-ints`` lists (a JSON array of strings)."""
    if raw is None:
        return set()
    try:
        return set(_names.decode(raw))
    except msgspec.DecodeError as e:
        raise Malformed(
            f"header {H_INTS!r} must be a JSON array of header names, not {describe(raw)} ({e})"
        ) from None


def _decimal(name: str, value: str) -> int:
    """A header value that must be an integer, written as decimal text."""
    if _DECIMAL.fullmatch(value):
        try:
            return int(value)
        except ValueError:  # more digits than Python converts
            pass
    raise Malformed(
        f"header {name!r} must be an integer as decimal text (docs/wire-format.md), "
        f"not {describe(value)}"
    )


def _is_application(name: str) -> bool:
    """Whether a MESSAGE frame's header is the application's: not STOMP's,
    a broker's, or kew's STOMP bookkeeping (``kew-id``, ``kew-ints`` ...)."""
    lowered = name.lower()
    if lowered in RESERVED or lowered.startswith(BROKER_PREFIXES) or name == H_UNREADABLE:
        return False
    return not name.startswith("kew-") or name.startswith(ESCAPE) or name in PLAIN_KEW


def frame_id(headers: Mapping[str, str]) -> str:
    """The message id of a MESSAGE frame: ``kew-id``; a frame without one
    (a plain STOMP producer's) has the broker's ``message-id``, which every
    STOMP broker sets and keeps.  :class:`Malformed` if it is not an id."""
    raw = headers.get(H_ID)
    if raw is None:
        raw = headers.get(H_BROKER_ID)
    return check_id(raw)


def delivery_count(headers: Mapping[str, str]) -> int:
    """1 the first time; + kew's releases (``kew-redeliveries``, ignored
    when it is not a count) + 1 when the broker says ``redelivered``."""
    count = 1 + max(0, _int(headers.get(H_REDELIVERIES)))
    if headers.get("redelivered", "false").lower() == "true":
        count += 1
    return count


def _read(headers: Mapping[str, str], strict: bool) -> dict[str, str | int]:
    try:
        ints = _listed_ints(headers.get(H_INTS))
    except Malformed:
        if strict:
            raise
        ints = set()
    out: dict[str, str | int] = {}
    for k, v in headers.items():
        if not _is_application(k):
            continue
        value: str | int = v
        if k in ints or k in INT_HEADERS:
            try:
                value = _decimal(k, v)
            except Malformed:
                if strict:
                    raise
        out[k[len(ESCAPE) :] if k.startswith(ESCAPE) else k] = value
    return out


def read_frame(headers: Mapping[str, str], body: bytes) -> tuple[Message, int]:
    """(message, delivery count) of a MESSAGE frame, or :class:`Malformed`
    saying why the frame is not kew's wire format (the consumer dead-letters
    it at once).  kew's int headers are read as integers with or without
    ``kew-ints``; the names ``kew-ints`` lists must hold decimal text."""
    unreadable = headers.get(H_UNREADABLE)
    if unreadable:
        raise Malformed(unreadable)
    out = _read(headers, strict=True)
    for name in (H_DEAD_COUNT, H_DEAD_AT):  # kew's, not handed to the application
        if name in headers:
            _decimal(name, headers[name])
    check_kew_headers(out)
    return Message(frame_id(headers), body, out), delivery_count(headers)


def salvage_frame(headers: Mapping[str, str], body: bytes) -> Message:
    """The message to keep as a dead letter for a frame :func:`read_frame`
    refused: its body and every application header (as text where it is
    not an integer), under its id or else the broker's."""
    try:
        fallback = check_id(headers.get(H_BROKER_ID))
    except Malformed:
        fallback = f"stomp-{uuid.uuid4().hex}"
    return salvage(headers.get(H_ID), body, _read(headers, strict=False), fallback_id=fallback)


def _from_frame(headers: Mapping[str, str], body: bytes) -> tuple[Message, int]:
    """(message, delivery count) of a frame, never failing: for listings
    (peek, dead letters, requeue), where a damaged header is kept as text."""
    mid = headers.get(H_ID) or headers.get(H_BROKER_ID, "")
    return Message(mid, body, _read(headers, strict=False)), delivery_count(headers)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
