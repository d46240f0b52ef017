"""Stream entries, dead letters and delayed messages of the Redis provider:
how kew reads and writes them (docs/providers/redis.md, Wire format).

An entry is read through :mod:`kew.qchan.spi.wire`: what kew cannot read
raises :class:`~kew.qchan.spi.wire.Malformed`, and :func:`salvaged` keeps
what it can of it for the dead letters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from kew.qchan.spi import DeadLetter, Delivery, Message, now_ms
from kew.qchan.spi.wire import (
    INT_HEADERS,
    MAX_ID_LENGTH,
    Malformed,
    check_id,
    headers_from_json,
    salvage,
)

encode_headers = msgspec.json.Encoder().encode

FIELDS = (b"id", b"body", b"headers")


def text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(raw: Any, default: int) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return default


#: Headers as kew writes them: a JSON object of text and integer values
#: (what this refuses, :func:`~kew.qchan.spi.wire.headers_from_json` reads
#: again to say why, or to accept it).
_kew_headers = msgspec.json.Decoder(dict[str, str | int])
_INT_HEADERS = tuple(INT_HEADERS)


def message(fields: Mapping[bytes, Any]) -> Message:
    """The message of a stream entry (fields ``id``, ``body``, ``headers``;
    others are ignored), or :class:`Malformed` saying what is wrong.

    An entry as kew writes it (an id of ASCII letters and digits, headers
    of text and integers, kew's integer headers integers) is taken at
    once; any other goes through every check of :mod:`kew.qchan.spi.wire`,
    which accepts it or says what is wrong (the same answer: what is taken
    at once passes those checks too)."""
    mid = fields.get(b"id")
    body = fields.get(b"body")
    raw = fields.get(b"headers")
    if (
        mid.__class__ is bytes
        and body.__class__ is bytes
        and raw.__class__ is bytes
        and 0 < len(mid) <= MAX_ID_LENGTH
        and mid.isalnum()  # (bytes: ASCII letters and digits only)
    ):
        try:
            headers = _kew_headers.decode(raw)
        except msgspec.DecodeError:
            pass
        else:
            for name in _INT_HEADERS:
                value = headers.get(name)
                if value is not None and value.__class__ is not int:
                    break
            else:
                return Message(mid.decode(), body, headers)
    return _checked(fields)


def _checked(fields: Mapping[bytes, Any]) -> Message:
    """:func:`message` read with every check, for what is not plainly kew's."""
    if not any(f in fields for f in FIELDS):
        names = ", ".join(sorted(repr(k.decode(errors="replace")) for k in fields))
        raise Malformed(f"a stream entry without kew's fields id, body, headers (it has {names})")
    mid = check_id(fields.get(b"id"))
    body = fields.get(b"body")
    if body is None:
        raise Malformed("the stream entry has no body field")
    headers = fields.get(b"headers")
    if headers is None:
        raise Malformed("the stream entry has no headers field")
    return Message(mid, body, headers_from_json(headers))


def salvaged(entry_id: str, fields: Mapping[bytes, Any]) -> Message:
    """What can be kept of an entry kew cannot read (the entry id stands in
    for a missing or bad message id)."""
    raw = fields.get(b"headers")
    try:
        headers = msgspec.json.decode(raw) if isinstance(raw, bytes) else None
    except msgspec.DecodeError:
        headers = None
    return salvage(
        fields.get(b"id"),
        fields.get(b"body"),
        headers if isinstance(headers, dict) else None,
        fallback_id=entry_id,
    )


#: An entry kew cannot read: entry id, what is kept of it, delivery count, reason.
Bad = tuple[str, Message, int, str]


def sort_out(
    entries: Any, counts: Mapping[str, int] | None = None
) -> tuple[list[Delivery], list[Bad], list[str]]:
    """The entries an XREADGROUP or XAUTOCLAIM returned (``counts``: their
    delivery counts by entry id, 1 if missing): the deliveries (tag: the
    entry id), those kew cannot read (to dead-letter), and the ids of those
    deleted while pending (no fields: to ack)."""
    out: list[Delivery] = []
    bad: list[Bad] = []
    gone: list[str] = []
    for entry_id, fields in entries:
        eid = entry_id.decode() if entry_id.__class__ is bytes else text(entry_id)
        if not fields:
            gone.append(eid)
            continue
        count = counts.get(eid, 1) if counts else 1
        try:
            out.append(Delivery(message(fields), count, eid))
        except Malformed as e:
            bad.append((eid, salvaged(eid, fields), count, str(e)))
    return out, bad, gone


def dead_letter(entry_id: Any, fields: Mapping[bytes, Any]) -> DeadLetter:
    """A dead-letter entry, read leniently (another program may have written
    it): whatever is missing or unreadable gets a stand-in."""
    eid = text(entry_id)
    reason = fields.get(b"reason")
    return DeadLetter(
        salvaged(eid, fields),
        _int(fields.get(b"count"), 1),
        reason.decode(errors="replace") if isinstance(reason, bytes) else "(no reason recorded)",
        _int(fields.get(b"dead_at"), _int(eid.partition("-")[0], 0)),
    )


def dead_fields(m: Message, count: int, reason: str) -> dict[str, Any]:
    return {
        "id": m.id,
        "body": m.body,
        "headers": encode_headers(m.headers),
        "count": count,
        "reason": reason,
        "dead_at": now_ms(),
    }


def pack(message_id: str, headers: bytes, body: bytes) -> bytes:
    mid = message_id.encode()
    return b"%d:%s%d:%s%s" % (len(mid), mid, len(headers), headers, body)


def due(score: Any) -> int | None:
    """The mover's answer (a sorted-set score): epoch ms, or None for none
    (or a score that is never due, ``inf`` or ``nan``: another program's)."""
    if score is None:
        return None
    try:
        at = float(text(score))
    except ValueError:
        return None
    if math.isnan(at) or at == math.inf:
        return None
    return 0 if at == -math.inf else int(at)


# Move due delayed messages into the stream; returns the due time (epoch ms)
# of the next delayed message, or nil.  A delayed message is packed as
# "<len(id)>:<id><len(headers)>:<headers><body>" (see pack); a member that
# is not (another program wrote it) goes to the dead letters, whole, as the
# body (its id "delayed-<now>-<n>").  What the fields hold is checked by the
# consumer, as for any entry.
MOVE_DUE = """
local function field(s, p)
  local n = string.match(s, '^%d+:', p)
  if not n then return nil end
  local len = tonumber(string.sub(n, 1, -2))
  local from = p + #n
  if from + len - 1 > #s then return nil end
  return string.sub(s, from, from + len - 1), from + len
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for i, s in ipairs(due) do
  local id, p = field(s, 1)
  local headers
  if id then headers, p = field(s, p) end
  if headers then
    redis.call('XADD', KEYS[2], '*', 'id', id, 'body', string.sub(s, p), 'headers', headers)
  else
    redis.call('XADD', KEYS[3], '*', 'id', 'delayed-' .. ARGV[1] .. '-' .. i, 'body', s,
      'headers', '{}', 'count', 0, 'reason', ARGV[2], 'dead_at', ARGV[1])
  end
  redis.call('ZREM', KEYS[1], s)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return first[2] end
return false
"""

BAD_DELAYED = str(
    Malformed(
        "a delayed message (sorted-set member) that is not "
        "<len(id)>:<id><len(headers)>:<headers><body>"
    )
)
