"""``sqlite:///path``: durable queues in one SQLite file. The default.

Any number of processes on one machine may use the same file.  Messages are
rows; a consumer *claims* rows by setting a lease (``avail_at`` in the
future, and its own token as ``owner``), extends the lease while the rows
are unsettled, and deletes them on ack.  A consumer that dies stops
extending, so its rows become available again when the lease runs out:
crash redelivery.  Delayed messages are rows whose ``avail_at`` is later.

``sqlite:///kew.sqlite3`` is relative to the working directory,
``sqlite:////var/lib/kew/q.db`` absolute.  Options: ``lease`` (seconds a
claim lasts without extension, default 30), ``poll`` (seconds between looks
for cross-process work when idle, default 0.05), ``sync`` (``full``, the
default: every commit is fsync'd before ``send`` returns; ``normal``: survives
a process crash but maybe not a power loss), ``busy_timeout`` (seconds to
wait for a lock, default 30), ``max_message_size`` (bytes, default 64 MiB).

Another program may insert rows itself (docs/wire-format.md, SQLite): each
row is read through :mod:`kew.qchan.spi.wire`, and one kew cannot read (bad
id, headers that are not a JSON object of text and integers, a body that is
not bytes, an ``avail_at`` that is not a number) is dead-lettered with the
reason in the transaction that claimed it.  A consumer whose file was
deleted, replaced or is no longer a database fails for good
(``ConsumerFailed``).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import msgspec

from kew.qchan.spi import (
    Capability,
    ConfigError,
    ConsumerFailed,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    now_ms,
)
from kew.qchan.spi.dedupe import ClaimResult
from kew.qchan.spi.wire import (
    Malformed,
    check_id,
    check_kew_headers,
    headers_from_json,
    salvage,
)

log = logging.getLogger("kew.sqlite")

SCHEMES = ("sqlite",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kew_queue (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kew_message (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    queue    TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    body     BLOB    NOT NULL,
    headers  BLOB    NOT NULL,
    avail_at INTEGER NOT NULL,  -- epoch ms: due time, or lease end while claimed
    owner    TEXT,              -- consumer token while claimed
    count    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS kew_message_next ON kew_message (queue, avail_at, seq);
CREATE TABLE IF NOT EXISTS kew_dead (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    queue    TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    body     BLOB    NOT NULL,
    headers  BLOB    NOT NULL,
    count    INTEGER NOT NULL,
    reason   TEXT    NOT NULL,
    dead_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kew_dead_queue ON kew_dead (queue, seq);
"""

_encode_headers = msgspec.json.Encoder().encode
_any_json = msgspec.json.Decoder().decode


# -- reading rows another program wrote -------------------------------------
#
# Any program may insert rows with the sqlite3 module or any other SQLite
# binding (docs/wire-format.md), and SQLite keeps whatever type it is given
# in a column (a TEXT body, a BLOB id, a JSON array as headers).  So kew
# reads every column that holds text or bytes CAST AS BLOB (the bytes stored:
# the sqlite3 module cannot return TEXT that is not UTF-8 and would fail the
# whole claim), with the SQL type where it matters, and checks each row
# through kew.qchan.spi.wire.  A row it cannot read is dead-lettered at once
# with the reason, in the transaction that found it; it is never held.

#: A row's columns as kew reads them, in the order :func:`_read` takes them.
_ROW = (
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


_typed_headers = msgspec.json.Decoder(dict[str, str | int]).decode


def _headers(raw: bytes) -> dict[str, str | int]:
    """``headers_from_json``, fast for good headers (kew's own: one typed
    decode); any others go through it for the checks and the reason."""
    try:
        headers = _typed_headers(raw)
    except msgspec.DecodeError:
        return headers_from_json(raw)
    check_kew_headers(headers)
    return headers


def _read(row: Sequence[Any], fallback_id: str) -> tuple[Message, Malformed | None]:
    """A row's message and None, or what can be kept of it (``salvage``) and
    why it cannot be delivered.  ``row`` starts with the columns of
    :data:`_ROW`."""
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


def _int(value: Any, default: int) -> int:
    """An INTEGER column's value, or ``default`` when a program stored
    something else there."""
    return value if isinstance(value, int) else default


def _text(value: Any) -> str:
    """A TEXT column read CAST AS BLOB."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _not_due(avail_type: str, avail_at: Any) -> Malformed:
    shown = avail_at.decode(errors="replace") if isinstance(avail_at, bytes) else avail_at
    if isinstance(shown, str) and len(shown) > 40:
        shown = shown[:37] + "..."
    detail = "" if shown is None else f" ({shown!r})"
    return Malformed(
        f"avail_at is {_SQL_TYPES.get(avail_type, 'a BLOB')}{detail}, "
        "not a time in epoch milliseconds (an INTEGER)"
    )


# SQLite result codes (the low byte of an extended code) and extended codes
# that mean the file this connection has open is not (or no longer) the
# database: no retry can help, so a consumer fails for good.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_READONLY_DBMOVED = 1032


def _lost(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return "file is not a database" in str(e) or "malformed" in str(e)
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or code == _SQLITE_READONLY_DBMOVED


# -- options ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    path: str
    lease_ms: int
    poll: float
    sync: str
    busy_timeout: float
    max_message_size: int

    @classmethod
    def from_url(cls, url: str) -> Options:
        parsed = ProviderURL.parse(url, SCHEMES)
        if parsed.hosts:
            raise ConfigError(
                f"sqlite URLs name a file, not a host: use sqlite:///relative/path or "
                f"sqlite:////absolute/path, not {parsed.redacted!r}"
            )
        if not parsed.path:
            raise ConfigError(f"no database file in {parsed.redacted!r}: sqlite:///kew.sqlite3")
        options = cls(
            path=parsed.path,
            lease_ms=round(parsed.get_float("lease", 30.0, minimum=0.1) * 1000),
            poll=parsed.get_float("poll", 0.05, minimum=0.001),
            sync=parsed.get_choice("sync", "full", ("full", "normal")),
            busy_timeout=parsed.get_float("busy_timeout", 30.0),
            max_message_size=parsed.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
        )
        parsed.finish()
        return options


def enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode, waiting up to ``timeout`` seconds for
    other connections.

    Changing the journal mode takes an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler, while another
    process opens or writes the same file.  A file already in WAL mode (the
    usual case, once its first user set it) needs no change at all.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def _identity(path: str) -> tuple[int, int] | None:
    """The device and inode of a file (None: cannot tell)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Db:
    """One SQLite connection, shared by threads under a lock."""

    def __init__(self, options: Options, sync: str | None = None) -> None:
        directory = os.path.dirname(os.path.abspath(options.path))
        if not os.path.isdir(directory):
            raise ConfigError(f"the directory of the sqlite database does not exist: {directory}")
        self.conn = sqlite3.connect(
            options.path,
            timeout=options.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
        )
        enable_wal(self.conn, options.busy_timeout)
        self.conn.execute(f"PRAGMA synchronous={(sync or options.sync).upper()}")
        self.lock = threading.Lock()
        self.path = os.path.abspath(options.path)
        self._identity = _identity(self.path)

    def lost(self) -> str | None:
        """Why the file this connection has open is no longer the database
        at its path (deleted, or replaced by another file), or None.  The
        connection would go on reading and writing the old file without an
        error while everyone else uses the new one: only a look from outside
        tells.  (A file overwritten in place SQLite tells itself, "file is
        not a database", once it reads it again.)"""
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the database file {self.path} was deleted"
        except OSError:
            return None  # cannot tell now
        if (st.st_dev, st.st_ino) != self._identity:
            return f"the database file {self.path} was replaced by another file"
        return None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database lock at once."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                # (SQLite may have rolled back already: then the error that
                # did it is the one to raise, not "no transaction is active")
                if self.conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement in its own (autocommit) transaction; rows changed."""
        with self.lock:
            return int(self.conn.execute(sql, args).rowcount)

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


# In-process wake-ups: a send wakes this process's waiting consumers at once;
# other processes' consumers notice within `poll`.
_signals: dict[str, threading.Condition] = {}
_signals_lock = threading.Lock()


def _signal(path: str) -> threading.Condition:
    key = os.path.realpath(path)
    with _signals_lock:
        return _signals.setdefault(key, threading.Condition())


# -- connector -------------------------------------------------------------


class SqliteConnector:
    lacks: dict[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted  # no password in repr or errors
        self.max_message_size = self.options.max_message_size
        try:
            self._db = _Db(self.options)
            with self._db.lock:
                self._db.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            if _lost(e):
                raise ConfigError(f"{self.options.path} is not a kew SQLite database: {e}") from e
            raise
        self._signal = _signal(self.options.path)

    def __repr__(self) -> str:
        return f"SqliteConnector({self.url!r})"

    def declare(self, queue: str) -> None:
        with self._db.write() as c:
            c.execute("INSERT OR IGNORE INTO kew_queue (name) VALUES (?)", (queue,))

    def producer(self, queue: str) -> SqliteProducer:
        return SqliteProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> SqliteConsumer:
        return SqliteConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> SqliteBrowser:
        return SqliteBrowser(self, queue)

    def delete(self, queue: str) -> None:
        with self._db.write() as c:
            c.execute("DELETE FROM kew_message WHERE queue = ?", (queue,))
            c.execute("DELETE FROM kew_dead WHERE queue = ?", (queue,))
            c.execute("DELETE FROM kew_queue WHERE name = ?", (queue,))

    def dedupe_store(self, namespace: str) -> SqliteDedupeStore:
        """Records for ``kew.idempotency`` in this file (table ``kew_once``)."""
        return SqliteDedupeStore(self.options, namespace)

    def close(self) -> None:
        self._db.close()


# -- producer --------------------------------------------------------------


_INSERT = "INSERT INTO kew_message (queue, id, body, headers, avail_at) VALUES (?,?,?,?,?)"


def _rows(queue: str, limit: int, messages: Sequence[Message]) -> list[tuple[Any, ...]]:
    now = now_ms()
    rows = []
    for m in messages:
        if len(m.body) > limit:
            raise MessageTooLarge(len(m.body), limit, queue)
        due = now if m.deliver_at is None else max(now, m.deliver_at)
        rows.append((queue, m.id, m.body, _encode_headers(m.headers), due))
    return rows


class SqliteProducer:
    def __init__(self, connector: SqliteConnector, queue: str) -> None:
        self._db = _Db(connector.options)
        self._limit = connector.max_message_size
        self._queue = queue
        self._signal = connector._signal

    def _rows(self, messages: Sequence[Message]) -> list[tuple[Any, ...]]:
        return _rows(self._queue, self._limit, messages)

    _INSERT = _INSERT

    def send(self, message: Message) -> None:
        self._db.execute(self._INSERT, self._rows((message,))[0])
        with self._signal:
            self._signal.notify_all()

    def send_many(self, messages: Sequence[Message]) -> None:
        rows = self._rows(messages)
        with self._db.write() as c:  # one transaction, one fsync, for the batch
            c.executemany(self._INSERT, rows)
        with self._signal:
            self._signal.notify_all()

    def close(self) -> None:
        self._db.close()


# -- consumer --------------------------------------------------------------


#: Seconds between looks at a consumer's database file (``_Db.lost``).
_CHECK_EVERY = 1.0


class SqliteConsumer:
    def __init__(self, connector: SqliteConnector, queue: str, prefetch: int) -> None:
        # Claims, acks and dead-letter moves are not fsync'd: in WAL mode they
        # survive a process crash, and one lost to a power cut only means a
        # redelivery, which at-least-once allows.  Sends are always fsync'd.
        self._db = _Db(connector.options, sync="normal")
        self._options = connector.options
        self._limit = connector.max_message_size
        self._outbox: _Db | None = None  # for settle(): synced like a send
        self._outbox_lock = threading.Lock()
        self._queue = queue
        self._prefetch = prefetch
        self._lease = connector.options.lease_ms
        self._poll = connector.options.poll
        self._signal = connector._signal
        self._owner = os.urandom(12).hex()
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._failed: ConsumerFailed | None = None
        self._check_at = 0.0  # when to look at the database file next (lost())
        self._keeper = threading.Thread(
            target=self._keep_leases, name="kew-sqlite-lease", daemon=True
        )
        self._keeper.start()

    def _claim(self, count: int) -> list[Delivery]:
        now = now_ms()
        good: list[Delivery] = []
        with self._db.write() as c:
            self._bury_undue(c, count)
            rows = c.execute(
                "UPDATE kew_message SET avail_at = ?, owner = ?, count = count + 1 "
                "WHERE seq IN (SELECT seq FROM kew_message WHERE queue = ? AND avail_at <= ? "
                "ORDER BY avail_at, seq LIMIT ?) "
                f"RETURNING {_ROW}, count",
                (now + self._lease, self._owner, self._queue, now, count),
            ).fetchall()
            rows.sort()
            dead: list[tuple[int, Message, int, Malformed]] = []
            seqs: list[int] = []
            for row in rows:
                seq, n = row[0], _int(row[6], 1)
                message, problem = _read(row, f"sqlite-{seq}")
                if problem is None:
                    good.append(Delivery(message, max(n, 1), seq))
                    seqs.append(seq)
                else:
                    dead.append((seq, message, n, problem))
            self._bury(c, dead)
        with self._held_lock:
            self._held.update(seqs)  # only rows delivered: a dead one is gone already
        return good

    def _bury_undue(self, c: sqlite3.Connection, count: int) -> None:
        """Dead-letter rows whose ``avail_at`` is text, bytes (SQLite sorts
        them after every number) or NULL (a table made without NOT NULL):
        never due, they would wait for ever.  (Two index searches: an OR
        would scan the queue.)"""
        rows = c.execute(
            f"SELECT {_ROW}, count, typeof(avail_at), CAST(avail_at AS BLOB) FROM kew_message "
            "WHERE seq IN (SELECT seq FROM kew_message WHERE queue = ?1 AND avail_at >= '' "
            "UNION ALL SELECT seq FROM kew_message WHERE queue = ?1 AND avail_at IS NULL) "
            "LIMIT ?2",
            (self._queue, count),
        ).fetchall()
        self._bury(
            c,
            [
                (row[0], _read(row, f"sqlite-{row[0]}")[0], _int(row[6], 0), _not_due(*row[7:9]))
                for row in rows
            ],
        )

    def _bury(
        self, c: sqlite3.Connection, dead: Sequence[tuple[int, Message, int, Malformed]]
    ) -> None:
        """Move rows kew cannot deliver to the dead letters (in the caller's
        transaction): what could be read of them, and why."""
        if not dead:
            return
        now = now_ms()
        for seq, message, _, problem in dead:
            log.warning(
                "kew: row %d of %s (id %s) is dead-lettered: %s",
                seq,
                self._queue,
                message.id,
                problem,
            )
        c.executemany(
            "INSERT INTO kew_dead (queue, id, body, headers, count, reason, dead_at) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (self._queue, m.id, m.body, _encode_headers(m.headers), n, str(problem), now)
                for _, m, n, problem in dead
            ],
        )
        c.executemany("DELETE FROM kew_message WHERE seq = ?", [(seq,) for seq, *_ in dead])

    def _next_due(self) -> float | None:
        rows = self._db.read(
            "SELECT MIN(avail_at) FROM kew_message WHERE queue = ? AND avail_at < ''",
            (self._queue,),
        )
        due = rows[0][0]
        return None if not isinstance(due, int | float) else (due - now_ms()) / 1000

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._fetch(max_count, timeout)
        except sqlite3.Error as e:
            if _lost(e):
                raise self._fail(f"{self._db.path}: {e}") from e
            raise

    def _fail(self, problem: str) -> ConsumerFailed:
        """Fail for good: this fetch and every later one raise (the runtime
        names the queue)."""
        self._failed = ConsumerFailed(problem)
        return self._failed

    def _fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= self._check_at:  # at most once a second: a stat
                self._check_at = now + _CHECK_EVERY
                problem = self._db.lost()
                if problem is not None:
                    raise self._fail(problem)
            with self._held_lock:
                room = min(max_count, self._prefetch - len(self._held))
            if room > 0:
                got = self._claim(room)
                if got:
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            wait = min(left, self._poll)
            if room > 0:
                due = self._next_due()
                if due is not None and due < wait:
                    wait = max(due, 0.001)
            with self._signal:
                self._signal.wait(wait)
        return []

    def _settle(self, delivery: Delivery, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run ``statements`` (each ending with ``seq = ? AND owner = ?``)
        for a delivery this consumer still holds; else do nothing."""
        seq = delivery.tag
        with self._held_lock:
            if seq not in self._held:
                return  # settled already, or handed back at close
            self._held.discard(seq)
        if len(statements) == 1:
            sql, args = statements[0]
            self._db.execute(sql, (*args, seq, self._owner))
            return
        with self._db.write() as c:
            for sql, args in statements:
                c.execute(sql, (*args, seq, self._owner))

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, ("DELETE FROM kew_message WHERE seq = ? AND owner = ?", ()))

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: the inserts and the deletes in one transaction,
        synced like a send."""
        rows = [r for queue, m in sends for r in _rows(queue, self._limit, (m,))]
        with self._held_lock:
            seqs = [d.tag for d in acks if d.tag in self._held]
            self._held.difference_update(seqs)
        if not rows and not seqs:
            return
        with self._outbox_lock:
            if self._outbox is None:
                self._outbox = _Db(self._options)
        with self._outbox.write() as c:
            c.executemany(_INSERT, rows)
            c.executemany(
                "DELETE FROM kew_message WHERE seq = ? AND owner = ?",
                [(seq, self._owner) for seq in seqs],
            )
        if rows:
            with self._signal:
                self._signal.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._settle(
            delivery,
            (
                "INSERT INTO kew_dead (queue, id, body, headers, count, reason, dead_at) "
                "SELECT queue, CAST(id AS TEXT), CAST(body AS BLOB), headers, count, ?, ? "
                "FROM kew_message WHERE seq = ? AND owner = ?",
                (reason, now_ms()),
            ),
            ("DELETE FROM kew_message WHERE seq = ? AND owner = ?", ()),
        )

    def release(self, delivery: Delivery) -> None:
        # Back at the head of the queue, and the hand-back is not counted.
        self._settle(
            delivery,
            (
                "UPDATE kew_message SET avail_at = 0, owner = NULL, count = count - 1 "
                "WHERE seq = ? AND owner = ?",
                (),
            ),
        )
        with self._signal:
            self._signal.notify_all()

    def _keep_leases(self) -> None:
        interval = self._lease / 3000
        while not self._closed.wait(interval):
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:
                with self._db.write() as c:
                    c.executemany(
                        "UPDATE kew_message SET avail_at = ? WHERE seq = ? AND owner = ?",
                        [(now_ms() + self._lease, seq, self._owner) for seq in held],
                    )
            except sqlite3.Error:
                continue  # a busy moment; the lease has two more tries before it runs out

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._keeper.join()
        with self._held_lock:
            held = list(self._held)
            self._held.clear()
        if self._failed is None:  # else the file is gone: nothing to hand back to
            with self._db.write() as c:
                c.executemany(
                    "UPDATE kew_message SET avail_at = 0, owner = NULL, count = count - 1 "
                    "WHERE seq = ? AND owner = ?",
                    [(seq, self._owner) for seq in held],
                )
        self._db.close()
        with self._outbox_lock:
            if self._outbox is not None:
                self._outbox.close()
        with self._signal:
            self._signal.notify_all()


# -- browser ---------------------------------------------------------------

_DEAD_ID = re.compile(r"sqlite-dead-([0-9]+)")


def _dead_id(seq: int) -> str:
    """The id a dead letter without a good one is listed under."""
    return f"sqlite-dead-{seq}"


class SqliteBrowser:
    def __init__(self, connector: SqliteConnector, queue: str) -> None:
        self._db = connector._db
        self._queue = queue
        self._signal = connector._signal

    def peek(self, limit: int) -> Sequence[Message]:
        """Ready messages; a row kew cannot read shows as what a consumer
        will keep of it in the dead letters."""
        rows = self._db.read(
            f"SELECT {_ROW} FROM kew_message WHERE queue = ? AND avail_at <= ? "
            "ORDER BY avail_at, seq LIMIT ?",
            (self._queue, now_ms(), limit),
        )
        return [_read(row, f"sqlite-{row[0]}")[0] for row in rows]

    def stats(self) -> QueueStats:
        now = now_ms()
        ((ready, in_flight, delayed),) = self._db.read(
            "SELECT COALESCE(SUM(avail_at <= ?1), 0), "
            "COALESCE(SUM(avail_at > ?1 AND owner IS NOT NULL), 0), "
            "COALESCE(SUM(avail_at > ?1 AND owner IS NULL), 0) "
            "FROM kew_message WHERE queue = ?2",
            (now, self._queue),
        )
        ((dead,),) = self._db.read("SELECT COUNT(*) FROM kew_dead WHERE queue = ?", (self._queue,))
        return QueueStats(ready, in_flight, delayed, dead)

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        rows = self._db.read(
            f"SELECT {_ROW}, count, CAST(reason AS BLOB), dead_at FROM kew_dead "
            "WHERE queue = ? ORDER BY seq LIMIT ?",
            (self._queue, limit),
        )
        return [
            DeadLetter(
                _read(row, _dead_id(row[0]))[0], _int(row[6], 0), _text(row[7]), _int(row[8], 0)
            )
            for row in rows
        ]

    def _where(self, ids: Collection[str] | None) -> tuple[str, list[Any]]:
        """The dead letters of this queue (with these ids: as listed, so
        also the ids :func:`_dead_id` gives rows without a good one)."""
        if ids is None:
            return "queue = ?", [self._queue]
        ids = list(ids)
        seqs = [int(m.group(1)) for i in ids if (m := _DEAD_ID.fullmatch(i))]
        return (
            f"queue = ? AND (CAST(id AS TEXT) IN ({','.join('?' * len(ids))}) "
            f"OR seq IN ({','.join('?' * len(seqs))}))",
            [self._queue, *ids, *seqs],
        )

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Each dead letter goes back as kew reads it (a row a program wrote
        to ``kew_dead`` with a bad id or bad headers goes back with the id it
        is listed under and the headers that could be kept)."""
        where, args = self._where(ids)
        with self._db.write() as c:
            rows = c.execute(
                f"SELECT {_ROW} FROM kew_dead WHERE {where} ORDER BY seq", args
            ).fetchall()
            now = now_ms()
            messages = [_read(row, _dead_id(row[0]))[0] for row in rows]
            c.executemany(
                _INSERT,
                [(self._queue, m.id, m.body, _encode_headers(m.headers), now) for m in messages],
            )
            c.executemany("DELETE FROM kew_dead WHERE seq = ?", [(row[0],) for row in rows])
        with self._signal:
            self._signal.notify_all()
        return len(rows)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        where, args = self._where(ids)
        with self._db.write() as c:
            return int(c.execute(f"DELETE FROM kew_dead WHERE {where}", args).rowcount)

    def purge(self) -> int:
        with self._db.write() as c:
            return int(
                c.execute(
                    "DELETE FROM kew_message WHERE queue = ? AND (owner IS NULL OR avail_at <= ?)",
                    (self._queue, now_ms()),
                ).rowcount
            )

    def close(self) -> None:
        pass


# -- dedupe store (kew.idempotency) ------------------------------------------

_ONCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS kew_once (
    namespace TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    done      INTEGER NOT NULL,  -- 1: done; 0: claimed
    token     TEXT,              -- the claimer's token while claimed
    until     INTEGER,           -- lease end (claimed), retention end (done; NULL: for ever)
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
"""


class SqliteDedupeStore:
    """Claims and done marks in the table ``kew_once``, each change one
    transaction (fsync'd with ``sync=full``).  ``atomic_once`` gives its
    effect the ``sqlite3.Connection`` inside the transaction that marks the
    key done: the effect's writes (to this database file) and the mark
    commit together or not at all."""

    def __init__(self, options: Options, namespace: str) -> None:
        self.namespace = namespace
        self._db = _Db(options)
        with self._db.lock:
            self._db.conn.executescript(_ONCE_SCHEMA)

    def __repr__(self) -> str:
        return f"SqliteDedupeStore({self.namespace!r})"

    def _row(self, c: sqlite3.Connection, key: str) -> tuple[int, str | None, int | None] | None:
        row = c.execute(
            "SELECT done, token, until FROM kew_once WHERE namespace = ? AND key = ?",
            (self.namespace, key),
        ).fetchone()
        if row is None:
            return None
        done, token, until = row
        if until is not None and until <= now_ms():
            return None  # past its lease or retention: as if absent
        return int(done), token, until

    def _put(
        self, c: sqlite3.Connection, key: str, done: int, token: str | None, until: int | None
    ) -> None:
        c.execute(
            "INSERT OR REPLACE INTO kew_once (namespace, key, done, token, until) "
            "VALUES (?,?,?,?,?)",
            (self.namespace, key, done, token, until),
        )

    def claim(self, key: str, token: str, lease_ms: int) -> ClaimResult:
        with self._db.write() as c:
            row = self._row(c, key)
            if row is not None and row[0]:
                return ClaimResult.DONE
            if row is not None and row[1] != token:
                return ClaimResult.HELD
            self._put(c, key, 0, token, now_ms() + lease_ms)
            return ClaimResult.CLAIMED

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        n = self._db.execute(
            "UPDATE kew_once SET until = ? WHERE namespace = ? AND key = ? AND done = 0 "
            "AND token = ?",
            (now_ms() + lease_ms, self.namespace, key, token),
        )
        return n > 0

    def complete(self, key: str, token: str, retain_ms: int | None) -> bool:
        with self._db.write() as c:
            row = self._row(c, key)
            self._put(c, key, 1, None, None if retain_ms is None else now_ms() + retain_ms)
            return row is None or (not row[0] and row[1] == token)

    def release(self, key: str, token: str) -> None:
        self._db.execute(
            "DELETE FROM kew_once WHERE namespace = ? AND key = ? AND done = 0 AND token = ?",
            (self.namespace, key, token),
        )

    def atomic_once(
        self, key: str, effect: Callable[[sqlite3.Connection], object], retain_ms: int | None
    ) -> bool:
        with self._db.write() as c:
            row = self._row(c, key)
            if row is not None and row[0]:
                return False
            effect(c)
            self._put(c, key, 1, None, None if retain_ms is None else now_ms() + retain_ms)
            return True

    def state(self, key: str) -> str | None:
        with self._db.lock:
            row = self._row(self._db.conn, key)
        if row is None:
            return None
        return "done" if row[0] else "claimed"

    def forget(self, key: str) -> None:
        self._db.execute(
            "DELETE FROM kew_once WHERE namespace = ? AND key = ?", (self.namespace, key)
        )

    def purge_expired(self) -> int:
        return self._db.execute(
            "DELETE FROM kew_once WHERE namespace = ? AND until IS NOT NULL AND until <= ?",
            (self.namespace, now_ms()),
        )

    def close(self) -> None:
        self._db.close()


def connect(url: str) -> SqliteConnector:
    return SqliteConnector(url)
