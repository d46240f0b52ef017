"""``sqlite:///path``: durable queues in one SQLite file. The default.

Any number of processes on one machine may use the same file.  Messages are
rows; a consumer *claims* rows by setting a lease (``avail_at`` in the
future, and its own token as ``owner``), extends the lease while the rows
are unsettled, and deletes them on ack.  A consumer that dies stops
extending, so its rows become available again when the lease runs out:
crash redelivery.  Delayed messages are rows whose ``avail_at`` is later.

**Schema** (:data:`kew.embedded._sqlite_db.SCHEMA`, made on connect, the
file put in WAL mode): ``kew_queue (name)`` the declared queues;
``kew_message (seq, queue, id, body, headers, avail_at, owner, count)`` the
messages, ``headers`` a JSON object, ``avail_at`` epoch ms (due time, or
lease end while claimed), ``count`` the deliveries so far; ``kew_dead`` the
dead letters (``..., count, reason, dead_at``); ``kew_once`` the records
of :mod:`kew.idempotency` (:mod:`kew.embedded._sqlite_dedupe`).

**URL and options.** ``sqlite:///kew.sqlite3`` is relative to the working
directory (the default URL: its absolute path is logged once per process),
``sqlite:////var/lib/kew/q.db`` absolute.  Options: ``lease`` (seconds a
claim lasts without extension, default 30), ``poll`` (seconds between looks
for cross-process work when idle, default 0.05), ``sync`` (``full``, the
default: every commit is fsync'd before ``send`` returns; ``normal``: survives
a process crash but maybe not a power loss), ``busy_timeout`` (seconds to
wait for a lock, default 30), ``max_message_size`` (bytes, default 64 MiB).

Another program may insert rows itself (docs/wire-format.md, SQLite): each
row is read through :mod:`kew.qchan.spi.wire`
(:mod:`kew.embedded._sqlite_rows`), and one kew cannot read (bad id, headers
that are not a JSON object of text and integers, a body that is not bytes,
an ``avail_at`` that is not a number) is dead-lettered with the reason in
the transaction that claimed it.  A consumer whose file was deleted,
replaced or is no longer a database fails for good (``ConsumerFailed``).

**Group commit.**  Sends from many threads share transactions: a send
that finds another one committing is committed with every other send then
waiting, in the next transaction, and each returns once its own is
committed (:mod:`kew.embedded._sqlite_group`).  The native async route
(``aio()``, :mod:`kew.embedded._sqlite_aio`) does the same for coroutines
with one writer thread per connector, through which its claims and settles
go too, so that no coroutine waits on the file's lock.

A connector used in a parent works in a child made by ``os.fork``: the
child opens connections of its own (:mod:`kew.embedded._sqlite_db`).  A
consumer belongs to the process that made it: start new ones in the child.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from kew.embedded import _sqlite_ops as ops
from kew.embedded._sqlite_aio import SqliteAsyncConnector
from kew.embedded._sqlite_db import CHECK_EVERY, SCHEMA, Db, lost, signal
from kew.embedded._sqlite_dedupe import SqliteDedupeStore
from kew.embedded._sqlite_group import GroupCommit, Job
from kew.embedded._sqlite_rows import (
    DEAD_ID,
    INSERT,
    ROW,
    dead_id,
    encode_headers,
    int_or,
    read,
    rows,
    text,
)
from kew.qchan.spi import (
    Capability,
    ConfigError,
    ConnectorBase,
    ConsumerFailed,
    DeadLetter,
    Delivery,
    KewError,
    Message,
    ProviderURL,
    QueueStats,
    now_ms,
)
from kew.qchan.spi.kit import HeldLeases

__all__ = [
    "SCHEMES",
    "Options",
    "SqliteBrowser",
    "SqliteConnector",
    "SqliteConsumer",
    "SqliteDedupeStore",
    "SqliteProducer",
    "connect",
]

log = logging.getLogger("kew.sqlite")

SCHEMES = ("sqlite",)


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

    def db(self, sync: str | None = None) -> Db:
        """A new connection to the file (``sync`` instead of :attr:`sync`)."""
        return Db(self.path, self.busy_timeout, sync or self.sync)


# -- connector -------------------------------------------------------------


class SqliteConnector(ConnectorBase):
    lacks: dict[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted  # no password in repr or errors
        self.max_message_size = self.options.max_message_size
        try:
            self._db = self.options.db()
            self._db.script(SCHEMA)
        except sqlite3.DatabaseError as e:
            if lost(e):
                raise ConfigError(f"{self.options.path} is not a kew SQLite database: {e}") from e
            raise
        self._signal = signal(self.options.path)
        self._sends: GroupCommit | None = None  # send_to's, made at its first use
        self._sends_lock = threading.Lock()
        self._sends_closed = False

    def __repr__(self) -> str:
        return f"SqliteConnector({self.url!r})"

    def send_group(self) -> GroupCommit:
        """The group commit of :meth:`send_to` (sync callers and coroutines):
        a connection of its own, closed with the connector."""
        with self._sends_lock:
            if self._sends_closed:
                raise KewError(f"the SQLite connector of {self.options.path} is closed")
            if self._sends is None:
                self._sends = GroupCommit(
                    self.options.db,
                    self.options.sync,
                    self._signal,
                    os.path.basename(self.options.path),
                )
            return self._sends

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``MultiSender``: every message in one transaction (one fsync),
        shared with the other callers waiting then (group commit)."""
        inserts = [r for queue, m in sends for r in rows(queue, self.max_message_size, (m,))]
        if inserts:
            self.send_group().run(Job(rows=inserts))

    def declare(self, queue: str) -> None:
        with self._db.write() as c:
            ops.declare(c, queue)

    def producer(self, queue: str) -> SqliteProducer:
        return SqliteProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> SqliteConsumer:
        return SqliteConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> SqliteBrowser:
        return SqliteBrowser(self, queue)

    def delete(self, queue: str) -> None:
        with self._db.write() as c:
            ops.delete(c, queue)

    def aio(self) -> SqliteAsyncConnector:
        """The native async route (``kew.aio``): one writer thread commits
        whatever the coroutines are waiting for; no I/O here."""
        return SqliteAsyncConnector(self)

    def dedupe_store(self, namespace: str) -> SqliteDedupeStore:
        """Records for ``kew.idempotency`` in this file (table ``kew_once``)."""
        return SqliteDedupeStore(self.options.db(), namespace)

    def close(self) -> None:
        with self._sends_lock:
            self._sends_closed = True
            if self._sends is not None:
                self._sends.close()
        self._db.close()


# -- producer --------------------------------------------------------------


class SqliteProducer:
    """Sends from any number of threads share transactions (group commit):
    a send that finds another under way is committed with the others
    waiting, in the next transaction; each returns once its own is
    committed (``fsync``'d, with ``sync=full``)."""

    def __init__(self, connector: SqliteConnector, queue: str) -> None:
        self._group = GroupCommit(
            connector.options.db, connector.options.sync, connector._signal, queue
        )
        self._limit = connector.max_message_size
        self._queue = queue

    @property
    def transactions(self) -> int:
        """Transactions committed so far (a statistic)."""
        return self._group.transactions

    def send(self, message: Message) -> None:
        self._group.run(Job(rows=rows(self._queue, self._limit, (message,))))

    def send_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        # one transaction, one fsync, for the batch (and whatever else waits)
        self._group.run(Job(rows=rows(self._queue, self._limit, messages)))

    def close(self) -> None:
        self._group.close()


# -- consumer --------------------------------------------------------------


class SqliteConsumer:
    def __init__(self, connector: SqliteConnector, queue: str, prefetch: int) -> None:
        # Claims, acks and dead-letter moves are not fsync'd: in WAL mode they
        # survive a process crash, and one lost to a power cut only means a
        # redelivery, which at-least-once allows.  Sends are always fsync'd.
        self._db = connector.options.db(sync="normal")
        self._options = connector.options
        self._limit = connector.max_message_size
        self._outbox: Db | None = None  # for settle(): synced like a send
        self._outbox_lock = threading.Lock()
        self._queue = queue
        self._prefetch = prefetch
        self._poll = connector.options.poll
        self._signal = connector._signal
        self._ops = ops.Claims(queue, os.urandom(12).hex(), connector.options.lease_ms)
        self._closed = threading.Event()
        self._renewing = threading.Lock()  # close() waits for a renewal under way
        self._failed: ConsumerFailed | None = None
        self._check_at = 0.0  # when to look at the database file next (lost())
        # the rows held (by seq), their leases renewed every lease/3
        self._held: HeldLeases[int] = HeldLeases(
            self._renew, self._ops.lease_ms / 3000, name="kew-sqlite-lease"
        )

    def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` deliveries
        (``WindowedConsumer``): a pull consumer takes only what ``fetch``
        asks for, so the bound is all there is to move."""
        self._prefetch = count

    # The deliveries of a fetch.

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._fetch(max_count, timeout)
        except sqlite3.Error as e:
            if lost(e):
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
                self._check_at = now + CHECK_EVERY
                problem = self._db.lost()
                if problem is not None:
                    raise self._fail(problem)
            room = self._held.room(self._prefetch, max_count)
            if room > 0:
                got = self._claim(room)
                if got:
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            wait = min(left, self._poll)
            if room > 0:
                with self._db.lock:
                    due = self._ops.next_due(self._db.conn)
                if due is not None and due < wait:
                    wait = max(due, 0.001)
            self._signal.wait(wait)
        return []

    def _claim(self, count: int) -> list[Delivery]:
        with self._db.write() as c:
            good = self._ops.claim(c, count)
        for d in good:  # only rows delivered: a dead one is gone already
            self._held.add(cast(int, d.tag), d)
        return good

    # Settling.

    def _take(self, delivery: Delivery) -> int | None:
        """The row of a delivery this consumer still holds (no longer held
        from now on); None if settled already, or handed back at close."""
        seq = cast(int, delivery.tag)
        return seq if self._held.take([seq]) else None

    def ack(self, delivery: Delivery) -> None:
        if (seq := self._take(delivery)) is not None:
            with self._db.lock:  # one statement: autocommit
                self._ops.ack(self._db.conn, (seq,))

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: the inserts and the deletes in one transaction,
        synced like a send."""
        inserts = [r for queue, m in sends for r in rows(queue, self._limit, (m,))]
        seqs = self._held.take([cast(int, d.tag) for d in acks])
        if not inserts and not seqs:
            return
        with self._outbox_lock:
            if self._outbox is None:
                self._outbox = self._options.db()
        with self._outbox.write() as c:
            c.executemany(INSERT, inserts)
            self._ops.ack(c, seqs)
        if inserts:
            self._signal.notify()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if (seq := self._take(delivery)) is not None:
            with self._db.write() as c:
                self._ops.dead_letter(c, seq, reason)

    def release(self, delivery: Delivery) -> None:
        if (seq := self._take(delivery)) is not None:
            with self._db.lock:
                self._ops.hand_back(self._db.conn, (seq,))
            self._signal.notify()

    def _renew(self, seqs: Sequence[int]) -> None:
        """Extend the leases of the held rows (HeldLeases, every lease/3)."""
        with self._renewing:
            if self._closed.is_set():
                return
            try:
                with self._db.write() as c:
                    self._ops.renew(c, seqs)
            except sqlite3.Error as e:  # a busy moment: two more tries before the lease ends
                log.warning("kew: renewing the leases on %s failed: %s", self._queue, e)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._renewing:
            held = self._held.close()
        if self._failed is None:  # else the file is gone: nothing to hand back to
            with self._db.write() as c:
                self._ops.hand_back(c, held)
        self._db.close()
        with self._outbox_lock:
            if self._outbox is not None:
                self._outbox.close()
        self._signal.notify()


# -- browser ---------------------------------------------------------------


class SqliteBrowser:
    def __init__(self, connector: SqliteConnector, queue: str) -> None:
        self._db = connector._db
        self._queue = queue
        self._signal = connector._signal

    def peek(self, limit: int) -> Sequence[Message]:
        """Ready messages; a row kew cannot read shows as what a consumer
        will keep of it in the dead letters."""
        ready = self._db.read(
            f"SELECT {ROW} FROM kew_message WHERE queue = ? AND avail_at <= ? "
            "ORDER BY avail_at, seq LIMIT ?",
            (self._queue, now_ms(), limit),
        )
        return [read(row, f"sqlite-{row[0]}")[0] for row in ready]

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
        found = self._db.read(
            f"SELECT {ROW}, count, CAST(reason AS BLOB), dead_at FROM kew_dead "
            "WHERE queue = ? ORDER BY seq LIMIT ?",
            (self._queue, limit),
        )
        return [
            DeadLetter(
                read(row, dead_id(row[0]))[0], int_or(row[6], 0), text(row[7]), int_or(row[8], 0)
            )
            for row in found
        ]

    def _where(self, ids: Collection[str] | None) -> tuple[str, list[Any]]:
        """The dead letters of this queue (with these ids: as listed, so
        also the ids ``dead_id`` gives rows without a good one)."""
        if ids is None:
            return "queue = ?", [self._queue]
        ids = list(ids)
        seqs = [int(m.group(1)) for i in ids if (m := DEAD_ID.fullmatch(i))]
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
            found = c.execute(
                f"SELECT {ROW} FROM kew_dead WHERE {where} ORDER BY seq", args
            ).fetchall()
            now = now_ms()
            messages = [read(row, dead_id(row[0]))[0] for row in found]
            c.executemany(
                INSERT,
                [(self._queue, m.id, m.body, encode_headers(m.headers), now) for m in messages],
            )
            c.executemany("DELETE FROM kew_dead WHERE seq = ?", [(row[0],) for row in found])
        self._signal.notify()
        return len(found)

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


# -- helpers ---------------------------------------------------------------

#: ``kew.connect.DEFAULT_URL`` (not imported: a provider does not import
#: kew.connect): a file in whatever the working directory is.
DEFAULT_URL = "sqlite:///kew.sqlite3"

_announced_in: int | None = None  # the pid that logged the default file's path
_announce_lock = threading.Lock()


def _announce_default(path: str) -> None:
    """Log, once per process, where the default URL's file is."""
    global _announced_in
    with _announce_lock:
        if _announced_in == os.getpid():
            return
        _announced_in = os.getpid()
    log.info(
        "kew: the queues are in the SQLite file %s (%s, the default URL: "
        "pass a URL or set KEW_URL to choose)",
        os.path.abspath(path),
        DEFAULT_URL,
    )


def connect(url: str) -> SqliteConnector:
    """The ``kew.providers`` entry point for ``sqlite://``."""
    if url == DEFAULT_URL:
        _announce_default(Options.from_url(url).path)
    return SqliteConnector(url)
