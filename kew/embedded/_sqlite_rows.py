"""The SQLite provider's rows: the ones it writes, and reading any row,
including those another program wrote (:mod:`kew.embedded.sqlite`).

Any program may insert rows with the sqlite3 module or any other SQLite
binding (docs/wire-format.md), and SQLite keeps whatever type it is given in
a column (a TEXT body, a BLOB id, a JSON array as headers).  So kew reads
every column that holds text or bytes CAST AS BLOB (the bytes stored: the
sqlite3 module cannot return TEXT that is not UTF-8 and would fail the whole
claim), with the SQL type where it matters, and checks each row through
:mod:`kew.qchan.spi.wire`.  A row it cannot read is dead-lettered at once
with the reason, in the transaction that found it; it is never held.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from kew.qchan.spi import Message, MessageTooLarge, now_ms
from kew.qchan.spi.wire import Malformed, check_id, check_kew_headers, headers_from_json, salvage

__all__ = [
    "DEAD_ID",
    "INSERT",
    "ROW",
    "dead_id",
    "encode_headers",
    "int_or",
    "not_due",
    "read",
    "rows",
    "text",
]

encode_headers = msgspec.json.Encoder().encode
_any_json = msgspec.json.Decoder().decode
_typed_headers = msgspec.json.Decoder(dict[str, str | int]).decode


# -- writing ----------------------------------------------------------------

INSERT = "INSERT INTO kew_message (queue, id, body, headers, avail_at) VALUES (?,?,?,?,?)"


def rows(queue: str, limit: int, messages: Sequence[Message]) -> list[tuple[Any, ...]]:
    """The :data:`INSERT` parameters of ``messages`` (due now, or at their
    ``deliver_at``); :class:`MessageTooLarge` for a body over ``limit``."""
    now = now_ms()
    out = []
    for m in messages:
        if len(m.body) > limit:
            raise MessageTooLarge(len(m.body), limit, queue)
        due = now if m.deliver_at is None else max(now, m.deliver_at)
        out.append((queue, m.id, m.body, encode_headers(m.headers), due))
    return out


# -- reading ------------------------------------------------------------------

#: A row's columns as kew reads them, in the order :func:`read` takes them.
ROW = (
    "seq, CAST(id AS BLOB), CAST(body AS BLOB), typeof(body), "
    "CAST(headers AS BLOB), typeof(headers)"
)

_SQL_TYPES = {"null": "NULL", "integer": "an INTEGER", "real": "a REAL", "text": "TEXT"}


def _message(raw_id: Any, body: Any, body_type: str, headers: Any, headers_type: str) -> Message:
    """The message a row holds, or :class:`Malformed` saying what is wrong."""
    mid = check_id(raw_id)
    if body_type == "text":
        try:
            body.decode()
        except UnicodeDecodeError:
            raise Malformed(
                "the body column is TEXT that is not UTF-8 (store bytes as a BLOB)"
            ) from None
    elif body_type != "blob":
        raise Malformed(f"the body column is {_SQL_TYPES.get(body_type, body_type)}, not a BLOB")
    if headers_type not in ("blob", "text"):
        raise Malformed(
            f"the headers column is {_SQL_TYPES.get(headers_type, headers_type)}, "
            "not a JSON object (TEXT or BLOB)"
        )
    return Message(mid, body, _headers(headers))


def _headers(raw: bytes) -> dict[str, str | int]:
    """``headers_from_json``, fast for good headers (kew's own: one typed
    decode); any others go through it for the checks and the reason."""
    try:
        headers = _typed_headers(raw)
    except msgspec.DecodeError:
        return headers_from_json(raw)
    check_kew_headers(headers)
    return headers


def read(row: Sequence[Any], fallback_id: str) -> tuple[Message, Malformed | None]:
    """A row's message and None, or what can be kept of it (``salvage``) and
    why it cannot be delivered.  ``row`` starts with the columns of
    :data:`ROW`."""
    _, raw_id, body, body_type, headers, headers_type = row[:6]
    try:
        return _message(raw_id, body, body_type, headers, headers_type), None
    except Malformed as e:
        table: Any = None
        if isinstance(headers, bytes):
            try:
                table = _any_json(headers)
            except msgspec.DecodeError:
                table = None
        kept = salvage(
            raw_id, body, table if isinstance(table, dict) else None, fallback_id=fallback_id
        )
        return kept, e


def int_or(value: Any, default: int) -> int:
    """An INTEGER column's value, or ``default`` when a program stored
    something else there."""
    return value if isinstance(value, int) else default


def text(value: Any) -> str:
    """A TEXT column read CAST AS BLOB."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def not_due(avail_type: str, avail_at: Any) -> Malformed:
    """Why a row whose ``avail_at`` is not a number (read CAST AS BLOB,
    with its ``typeof``) is never due."""
    shown = avail_at.decode(errors="replace") if isinstance(avail_at, bytes) else avail_at
    if isinstance(shown, str) and len(shown) > 40:
        shown = shown[:37] + "..."
    detail = "" if shown is None else f" ({shown!r})"
    return Malformed(
        f"avail_at is {_SQL_TYPES.get(avail_type, 'a BLOB')}{detail}, "
        "not a time in epoch milliseconds (an INTEGER)"
    )


# -- dead letters ---------------------------------------------------------------

#: The ids :func:`dead_id` gives.
DEAD_ID = re.compile(r"sqlite-dead-([0-9]+)")


def dead_id(seq: int) -> str:
    """The id a dead letter without a good one is listed under."""
    return f"sqlite-dead-{seq}"
