"""Rows another program inserts into a kew SQLite file with the sqlite3
module, as docs/wire-format.md tells it to: good ones are delivered, any
other ends in the dead letters with a reason, and the consumer goes on (and
says so).  The writer is raw sqlite3, its own connection, nothing of kew."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kew
from kew.qchan import DeadLetterInfo
from kew.qchan.spi import Connector
from kew.testing.foreign import (
    DEAD,
    DELIVERED,
    MISSING,
    CannotWrite,
    Envelope,
    ForeignProducerKit,
    ForeignWriter,
    Item,
    good_id,
)
from kew.testing.util import wait_for


def _path(url: str) -> str:
    return url.removeprefix("sqlite:///").partition("?")[0]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _body(seq: int) -> bytes:
    return msgspec.json.encode(Item(seq))


def _headers() -> bytes:
    return json.dumps({"content-type": "application/json"}).encode()


def _raw_row(case: str, seq: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": good_id(),
        "body": _body(seq),
        "headers": _headers(),
        "avail_at": _now_ms(),
    }
    changes: dict[str, dict[str, Any]] = {
        "headers not JSON": {"headers": "not json"},
        "headers a JSON array": {"headers": b'["content-type", "application/json"]'},
        "headers JSON as TEXT": {"headers": '{"content-type": "application/json"}'},
        "headers an INTEGER": {"headers": 5},
        "headers bytes not UTF-8": {"headers": b'{"a": "\xff"}'},
        "headers NULL": {"headers": None},
        "body as TEXT": {"body": _body(seq).decode()},
        "body TEXT not UTF-8": {"body": b"\xff\xfe"},  # stored CAST AS TEXT
        "body an INTEGER": {"body": 42},
        "id NULL": {"id": None},
        "id an INTEGER": {"id": 4242},
        "id a BLOB": {"id": good_id().encode()},
        "id a BLOB not UTF-8": {"id": b"\xff\xfeid"},
        "avail_at TEXT": {"avail_at": "soon"},
        "avail_at 0": {"avail_at": 0},
        "avail_at NULL": {"avail_at": None},
        "count TEXT": {"count": "many"},
    }
    row.update(changes[case])
    return row


class SqliteWriter:
    """Inserts rows with the sqlite3 module, like a program in another
    language would: its own connection, the documented columns, headers a
    JSON object (as a BLOB: UTF-8 JSON text), avail_at in epoch ms."""

    def __init__(self, url: str) -> None:
        # kew made the file and its tables (the connector fixture connected
        # first); in WAL mode, which this connection follows by itself.
        self.conn = sqlite3.connect(_path(url), timeout=30, isolation_level=None)

    def _insert(self, queue: str, row: dict[str, Any], text_body: bool = False) -> None:
        columns = ["queue", *row]
        marks = ["?"] * len(columns)
        if text_body:
            marks[columns.index("body")] = "CAST(? AS TEXT)"
        try:
            self.conn.execute(
                f"INSERT INTO kew_message ({', '.join(columns)}) VALUES ({', '.join(marks)})",
                [queue, *row.values()],
            )
        except sqlite3.IntegrityError as e:  # NOT NULL: SQLite refuses the row
            raise CannotWrite(f"SQLite refuses the row: {e}") from None

    def write(self, queue: str, envelope: Envelope) -> None:
        headers: dict[str, Any] = {}
        if envelope.content_type is not MISSING:
            headers["content-type"] = envelope.content_type
        for name, value in envelope.headers.items():
            if isinstance(value, bytes):
                try:
                    value = value.decode()
                except UnicodeDecodeError:
                    raise CannotWrite("JSON headers cannot hold bytes that are not UTF-8") from None
            headers[name] = value
        row: dict[str, Any] = {
            "body": envelope.body,
            "headers": json.dumps(headers).encode(),
            "avail_at": _now_ms(),
        }
        if envelope.id is not MISSING:  # left out: the column has no default
            row["id"] = envelope.id
        self._insert(queue, row)

    def write_raw(self, queue: str, case: str, seq: int) -> None:
        self._insert(queue, _raw_row(case, seq), text_body=case == "body TEXT not UTF-8")

    def close(self) -> None:
        self.conn.close()


class TestSqliteForeign(ForeignProducerKit):
    RAW_CASES = {
        "headers not JSON": DEAD,
        "headers a JSON array": DEAD,
        "headers JSON as TEXT": DELIVERED,
        "headers an INTEGER": DEAD,
        "headers bytes not UTF-8": DEAD,
        "headers NULL": DEAD,  # NOT NULL: cannot be written (skips)
        "body as TEXT": DELIVERED,  # its UTF-8 bytes, as stored
        "body TEXT not UTF-8": DEAD,
        "body an INTEGER": DEAD,
        "id NULL": DEAD,  # NOT NULL: cannot be written (skips)
        "id an INTEGER": DELIVERED,  # TEXT affinity: SQLite stores '4242'
        "id a BLOB": DELIVERED,
        "id a BLOB not UTF-8": DEAD,
        "avail_at TEXT": DEAD,  # never due: it would wait for ever
        "avail_at 0": DELIVERED,  # any past time is "now"
        "avail_at NULL": DEAD,  # NOT NULL: cannot be written (skips)
        "count TEXT": DELIVERED,  # kew's own column, leave it out; delivered anyway
    }

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/foreign.sqlite3?lease=1&max_message_size=1048576"

    @pytest.fixture
    def writer(self, url: str, connector: Connector) -> Iterator[ForeignWriter]:
        w = SqliteWriter(url)
        yield w
        w.close()


def _dead(q: kew.Queue[Item], n: int, timeout: float) -> list[DeadLetterInfo]:
    """The queue's dead letters, once there are ``n``."""
    wait_for(lambda: len(q.dead.list()) == n, timeout, what=f"{n} dead letters")
    return q.dead.list()


def _rows(path: str, table: str) -> int:
    with sqlite3.connect(path) as c:
        (n,) = c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(n)


def test_two_bad_rows_do_not_stop_a_consumer_with_prefetch_2(tmp_path: Path) -> None:
    """The issue's case: two rows whose headers are 'not json' filled a
    consumer of prefetch 2 (held, their leases kept, never settled), so that
    neither the good row after them nor a message kew sent was delivered,
    ever.  Now both bad rows are dead at once, and the good ones arrive."""
    url = f"sqlite:///{tmp_path}/foreign.sqlite3?lease=1"
    path = _path(url)
    conn = kew.connect(url)
    q = kew.Queue(conn, "jobs", Item)
    raw = sqlite3.connect(path, isolation_level=None)
    insert = "INSERT INTO kew_message (queue, id, body, headers, avail_at) VALUES (?,?,?,?,?)"
    for seq in (100, 101):
        raw.execute(insert, ("jobs", good_id(), _body(seq), "not json", _now_ms()))
    raw.execute(insert, ("jobs", good_id(), _body(1), _headers(), _now_ms()))
    raw.close()
    got: list[int] = []
    lock = threading.Lock()

    def handle(item: Item) -> None:
        with lock:
            got.append(item.seq)

    sub = q.sink(handle, prefetch=2)
    try:
        q.send(Item(2))
        wait_for(lambda: sorted(got) == [1, 2], 10, what="the good row and kew's message")
        dead = _dead(q, 2, 5)
        wait_for(lambda: sub.in_flight == 0, 5, what="nothing in flight")
        assert sub.alive and sub.healthy()
    finally:
        sub.stop()
    assert _rows(path, "kew_message") == 0
    assert [
        d.reason.startswith("malformed envelope: the headers are not a JSON") for d in dead
    ] == [
        True,
        True,
    ], [d.reason for d in dead]
    assert sorted(msgspec.json.decode(d.body, type=Item).seq for d in dead) == [100, 101]
    conn.close()


def test_dead_rows_are_listed_requeued_and_purged(tmp_path: Path) -> None:
    """A malformed row's dead letter keeps its body and the headers that
    could be kept, under the row's id (or ``sqlite-<seq>`` when it has no
    good one); the normal Browser API lists, requeues and purges it."""
    url = f"sqlite:///{tmp_path}/foreign.sqlite3?lease=1"
    path = _path(url)
    conn = kew.connect(url)
    q = kew.Queue(conn, "jobs", Item)
    raw = sqlite3.connect(path, isolation_level=None)
    insert = "INSERT INTO kew_message (queue, id, body, headers, avail_at) VALUES (?,?,?,?,?)"
    kept = '{"content-type": "application/json", "note": "kept", "ratio": 1.5}'
    raw.execute(insert, ("jobs", b"\xff-bad-id", _body(7), kept, _now_ms()))
    raw.execute(insert, ("jobs", "good-id-8", _body(8), "not json", _now_ms()))
    raw.close()
    got: list[int] = []
    with q.sink(lambda item: got.append(item.seq)):
        dead = _dead(q, 2, 10)
    by_body = {msgspec.json.decode(d.body, type=Item).seq: d for d in dead}
    assert by_body[7].id.startswith("sqlite-") and "message id" in by_body[7].reason
    assert by_body[7].headers == {"content-type": "application/json", "note": "kept"}
    assert by_body[8].id == "good-id-8" and by_body[8].headers == {}
    # requeued as kew reads them: valid ids and headers, so now delivered
    assert q.dead.requeue([by_body[7].id]) == 1
    with q.sink(lambda item: got.append(item.seq)):
        wait_for(lambda: got == [7], 10, what="the requeued message")
    # a row a program wrote into kew_dead itself, with no good id: listed
    # under sqlite-dead-<seq>, and purged by that id
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute(
        "INSERT INTO kew_dead (queue, id, body, headers, count, reason, dead_at) "
        "VALUES ('jobs', '', X'00', 'not json', 1, 'by hand', 0)"
    )
    raw.close()
    listed = {d.id: d for d in q.dead.list()}
    hand = next(d for i, d in listed.items() if i.startswith("sqlite-dead-"))
    assert (hand.reason, hand.body, hand.headers) == ("by hand", b"\x00", {})
    assert q.dead.purge([hand.id]) == 1
    assert q.dead.purge() == 1
    assert q.dead.list() == [] and _rows(path, "kew_dead") == 0
    conn.close()


def test_a_table_made_without_not_null_dead_letters_null_columns(tmp_path: Path) -> None:
    """Tables a program made itself (kew's CREATE TABLE IF NOT EXISTS then
    keeps them) may hold NULLs where kew's have NOT NULL: each such row is
    dead, none is stuck, and the good one is delivered."""
    path = str(tmp_path / "lax.sqlite3")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute(
        "CREATE TABLE kew_message (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, id TEXT, "
        "body BLOB, headers BLOB, avail_at INTEGER, owner TEXT, count INTEGER NOT NULL DEFAULT 0)"
    )
    conn = kew.connect(f"sqlite:///{path}?lease=1")
    q = kew.Queue(conn, "jobs", Item)
    insert = "INSERT INTO kew_message (queue, id, body, headers, avail_at) VALUES (?,?,?,?,?)"
    now = _now_ms()
    rows = {
        "no message id": (None, _body(101), _headers(), now),
        "body column is NULL": (good_id(), None, _headers(), now),
        "headers column is NULL": (good_id(), _body(103), None, now),
        "avail_at is NULL": (good_id(), _body(104), _headers(), None),
    }
    for values in rows.values():
        raw.execute(insert, ("jobs", *values))
    raw.execute(insert, ("jobs", good_id(), _body(1), _headers(), now))
    raw.close()
    got: list[int] = []
    with q.sink(lambda item: got.append(item.seq)) as sub:
        dead = _dead(q, 4, 10)
        wait_for(lambda: got == [1], 5, what="the good row")
        assert sub.healthy()
    reasons = sorted(d.reason for d in dead)
    for words in rows:
        assert any(words in r for r in reasons), (words, reasons)
    assert _rows(path, "kew_message") == 0
    conn.close()
