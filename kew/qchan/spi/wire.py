"""The wire format's names, and reading an envelope another program wrote.

Every provider reads its broker's framing (message id, headers, stream
fields, table columns, frame headers) *per message* through
:func:`read_envelope`'s helpers, inside a guard: a message whose framing
kew cannot read is turned into a :class:`Malformed` delivery that the
provider dead-letters at once with the reason, keeping whatever bytes it
has.  Nothing a producer writes may raise in a provider's I/O thread or
fetch loop (``docs/wire-format.md``, ``ARCHITECTURE.md``).

The rules, the same on every broker:

* A message id is 1 to :data:`MAX_ID_LENGTH` printable ASCII characters
  (no spaces or control characters).  kew makes 32 hex digits.
* A header name is text; a header value is text (UTF-8) or an integer.
  Anything else (a float, a boolean, null, bytes that are not UTF-8, a
  nested table or list) is refused with the header's name and type, since
  kew promises to give back exactly what it was given.
* Headers the broker itself adds (AMQP ``x-...``) are the provider's
  business: it drops or reads them before these checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from kew.qchan.spi import Headers, Message

__all__ = [
    "H_CONTENT_TYPE",
    "H_COUNT",
    "H_DEAD_AT",
    "H_DEAD_COUNT",
    "H_DEAD_REASON",
    "H_DELIVER_AT",
    "H_SENT_AT",
    "H_TYPE",
    "INT_HEADERS",
    "MAX_ID_LENGTH",
    "Malformed",
    "check_id",
    "check_kew_headers",
    "describe",
    "header_value",
    "headers_from_json",
    "headers_from_mapping",
    "salvage",
]

# -- names -----------------------------------------------------------------

#: The codec's media type (``application/json``, ``application/msgpack``,
#: ``application/kew-encrypted+json``).
H_CONTENT_TYPE = "content-type"
#: The Python type name of the body, informative.
H_TYPE = "kew-type"
#: When the message was made, epoch ms.
H_SENT_AT = "kew-sent-at"
#: Not to be delivered before this, epoch ms (delayed messages).
H_DELIVER_AT = "kew-deliver-at"
#: The attempt number of a rescheduled message (1 when absent).
H_COUNT = "kew-count"
#: On a dead letter (brokers that keep dead letters as messages): why,
#: how many times it had been delivered, and when it died (epoch ms).
H_DEAD_REASON = "kew-dead-reason"
H_DEAD_COUNT = "kew-dead-count"
H_DEAD_AT = "kew-dead-at"

#: kew's headers whose values are integers (epoch ms, a count).
INT_HEADERS = frozenset({H_SENT_AT, H_DELIVER_AT, H_COUNT, H_DEAD_COUNT, H_DEAD_AT})

#: The longest message id kew accepts (AMQP's ``message_id`` is a short
#: string of at most 255 bytes, so no broker can carry more everywhere).
MAX_ID_LENGTH = 255

_ID = re.compile(r"[\x21-\x7e]+")
_PREFIX = "malformed envelope: "


class Malformed(ValueError):
    """A message's framing is not kew's wire format.  ``str()`` is the
    reason a dead letter carries (``malformed envelope: ...``)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem if problem.startswith(_PREFIX) else _PREFIX + problem)


def describe(value: object, limit: int = 60) -> str:
    """A short, safe description of a value for a reason text."""
    kind = {
        bool: "a boolean",
        float: "a float",
        bytes: "bytes",
        bytearray: "bytes",
        type(None): "null",
        dict: "a table",
        list: "a list",
        tuple: "a list",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind} ({text})" if value is not None else kind


def check_id(value: object) -> str:
    """The message id, or :class:`Malformed` saying what is wrong with it."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise Malformed(f"the message id is {describe(value)}, not text") from None
    if value is None or value == "":
        raise Malformed("no message id")
    if not isinstance(value, str):
        raise Malformed(f"the message id is {describe(value)}, not text")
    if len(value) > MAX_ID_LENGTH:
        raise Malformed(f"the message id is {len(value)} characters long (at most {MAX_ID_LENGTH})")
    if not _ID.fullmatch(value):
        raise Malformed(f"the message id {value[:40]!r} has characters other than printable ASCII")
    return value


def header_value(name: str, value: object) -> str | int:
    """A header value as kew keeps it (text or integer), or
    :class:`Malformed` naming the header and what it holds."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # a client's int subclass becomes a plain int
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise Malformed(
                f"header {name!r} holds bytes that are not UTF-8 ({describe(value)}); "
                "kew header values are text or integers"
            ) from None
    raise Malformed(
        f"header {name!r} holds {describe(value)}; kew header values are text or integers"
    )


def _name(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        try:
            return bytes(key).decode()
        except UnicodeDecodeError:
            pass
    raise Malformed(f"a header name is {describe(key)}, not text")


def headers_from_mapping(
    items: Mapping[Any, object] | Iterable[tuple[object, object]],
    skip: Iterable[str] = (),
) -> dict[str, str | int]:
    """Check every header of a broker's header table; ``skip`` names those
    the provider handles itself (they are left out)."""
    pairs = items.items() if isinstance(items, Mapping) else items
    skipped = set(skip)
    out: dict[str, str | int] = {}
    for key, value in pairs:
        name = _name(key)
        if name in skipped:
            continue
        out[name] = header_value(name, value)
    check_kew_headers(out)
    return out


def check_kew_headers(headers: Mapping[str, str | int]) -> None:
    """kew's own integer headers (:data:`INT_HEADERS`) must be integers."""
    for name in INT_HEADERS.intersection(headers):
        value = headers[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise Malformed(
                f"header {name!r} must be an integer (docs/wire-format.md), not {describe(value)}"
            )


_json_object = msgspec.json.Decoder(dict[str, object])


def headers_from_json(raw: object, what: str = "the headers") -> dict[str, str | int]:
    """Headers stored as a JSON object (Redis, SQLite), checked."""
    if raw is None:
        raise Malformed(f"{what} are missing")
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise Malformed(f"{what} are {describe(raw)}, not a JSON object")
    try:
        decoded = _json_object.decode(raw)
    except msgspec.DecodeError as e:
        raise Malformed(f"{what} are not a JSON object: {e}") from None
    return headers_from_mapping(decoded)


def salvage(
    raw_id: object,
    body: object,
    headers: Mapping[Any, object] | None,
    *,
    fallback_id: str,
) -> Message:
    """The message to keep as a dead letter when its envelope is malformed:
    the id if it is one (else ``fallback_id``, which the provider derives
    from its own handle, e.g. a stream entry id), the body's bytes, and the
    headers that can be kept (the others are named in the reason)."""
    try:
        mid = check_id(raw_id)
    except Malformed:
        mid = fallback_id
    if isinstance(body, bytes):
        data = body
    elif isinstance(body, bytearray | memoryview):
        data = bytes(body)
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = b""
    kept: dict[str, str | int] = {}
    for key, value in (headers or {}).items():
        try:
            name = _name(key)
            kept[name] = header_value(name, value)
        except Malformed:
            continue
    keep: Headers = kept
    return Message(mid, data, keep)
