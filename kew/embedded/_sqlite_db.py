"""The SQLite provider's database handle (:mod:`kew.embedded.sqlite`): kew's
tables, one connection shared by threads under a lock, the in-process
wake-ups of consumers, and what happens to both in a child made by
``os.fork``.

**Fork.**  SQLite keeps the locks of a process in that process's memory, and
a child must not use a connection its parent opened: SQLite would count the
parent's locks as the child's, and when the parent then closed its last
connection it would take the file for unused and remove its write-ahead log
under the child (whose commits would be lost).  So, through
``os.register_at_fork``: before a fork, each handle's lock is taken (waiting
at most :data:`FORK_WAIT` seconds in all), so that no statement is half-way;
in the child, before anything else runs there, every handle gets a new lock,
the parent's connection is closed (which touches neither the parent's locks
nor its files) and the first use opens one of the child's own.  A handle
whose lock could not be taken is left alone in the child, never closed.  The
wake-up conditions are made again in the child too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from kew.core._sqlitefile import open_file
from kew.qchan.spi import ConfigError, KewError
from kew.qchan.spi.kit import Backoff

__all__ = ["CHECK_EVERY", "FORK_WAIT", "SCHEMA", "Db", "Signal", "Waker", "lost", "signal"]

log = logging.getLogger("kew.sqlite")

SCHEMA = """
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

# SQLite result codes (the low byte of an extended code) and extended codes
# that mean the file this connection has open is not (or no longer) the
# database: no retry can help, so a consumer fails for good.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_READONLY_DBMOVED = 1032


def lost(e: sqlite3.Error) -> bool:
    """Whether ``e`` says the file is not (or no longer) a database."""
    code = getattr(e, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return "file is not a database" in str(e) or "malformed" in str(e)
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or code == _SQLITE_READONLY_DBMOVED


def _identity(path: str) -> tuple[int, int] | None:
    """The device and inode of a file (None: cannot tell)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


#: Seconds between a consumer's looks at its database file (``Db.lost``).
CHECK_EVERY = 1.0

#: Seconds a fork waits, in all, for the handles in use by other threads.
FORK_WAIT = 1.0

#: The handles of this process, for the fork hooks.
_handles: weakref.WeakSet[Db] = weakref.WeakSet()

#: A parent's connections that were in use at a fork: kept, so that the
#: child never closes them (a connection closes itself when collected).
_left_behind: list[sqlite3.Connection] = []


class Db:
    """One SQLite connection to the file at ``path``, shared by threads
    under :attr:`lock`; in WAL mode, waiting up to ``busy_timeout`` seconds
    for a lock, with ``PRAGMA synchronous=<sync>``."""

    def __init__(self, path: str, busy_timeout: float, sync: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(f"the directory of the sqlite database does not exist: {directory}")
        self._open_args = (path, busy_timeout, sync)
        self._conn: sqlite3.Connection | None = self._open()
        self._closed = False
        self._idle_at_fork = False  # its lock taken by the fork hook
        self.lock = threading.Lock()
        self.path = os.path.abspath(path)
        self._identity = _identity(self.path)
        _handles.add(self)

    def _open(self) -> sqlite3.Connection:
        path, busy_timeout, sync = self._open_args
        # "database is locked" while switching to WAL: Backoff's pauses
        return open_file(
            path,
            busy_timeout=busy_timeout,
            synchronous=sync,
            pause=Backoff(first=0.005, most=0.1).delay,
        )

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (hold :attr:`lock`); a child's own after a fork."""
        if self._closed:
            raise KewError(f"the SQLite connector of {self.path} is closed")
        if self._conn is None:
            self._conn = self._open()
        return self._conn

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
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # (SQLite may have rolled back already: then the error that
                # did it is the one to raise, not "no transaction is active")
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement in its own (autocommit) transaction; rows changed."""
        with self.lock:
            return int(self.conn.execute(sql, args).rowcount)

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def script(self, sql: str) -> None:
        """Statements (DDL) run with ``executescript``."""
        with self.lock:
            self.conn.executescript(sql)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()

    def _after_fork(self) -> None:
        """In a child made by ``os.fork``, before anything else runs."""
        idle, self._idle_at_fork = self._idle_at_fork, False
        self.lock = threading.Lock()
        if self._closed or self._conn is None:
            return
        conn, self._conn = self._conn, None
        if not idle:  # a statement may be half-way: its state is not to be trusted
            _left_behind.append(conn)
            return
        try:
            conn.close()
        except sqlite3.Error as e:  # the child opens its own regardless
            log.debug("kew: closing the parent's connection to %s in a child: %s", self.path, e)


# -- in-process wake-ups ----------------------------------------------------------
#
# A send wakes this process's waiting consumers of the same file at once,
# sync and async; other processes' consumers notice within `poll`.


class Waker:
    """An ``asyncio.Event`` that a coroutine waits on, set from any thread
    (through ``loop.call_soon_threadsafe`` from another one)."""

    __slots__ = ("event", "loop", "thread")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.event = asyncio.Event()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
            return
        with suppress(RuntimeError):  # its loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class Signal:
    """Wakes the consumers of one database file in this process: threads
    waiting in :meth:`wait`, and coroutines whose :class:`Waker` is
    :meth:`watch`-ed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wakers: set[Waker] = set()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers) if self._wakers else ()
        for waker in wakers:
            waker.wake()

    def wait(self, timeout: float) -> None:
        """Until :meth:`notify` or ``timeout`` seconds."""
        with self._cond:
            self._cond.wait(timeout)

    def watch(self, waker: Waker) -> None:
        """Wake ``waker`` at each :meth:`notify` until :meth:`unwatch`."""
        with self._cond:
            self._wakers.add(waker)

    def unwatch(self, waker: Waker) -> None:
        with self._cond:
            self._wakers.discard(waker)


_signals: dict[str, Signal] = {}
_signals_lock = threading.Lock()


def signal(path: str) -> Signal:
    """The wake-ups of the database file at ``path``."""
    key = os.path.realpath(path)
    with _signals_lock:
        return _signals.setdefault(key, Signal())


def _before_fork() -> None:
    deadline = time.monotonic() + FORK_WAIT
    for db in list(_handles):
        db._idle_at_fork = db.lock.acquire(timeout=max(0.0, deadline - time.monotonic()))


def _after_fork_in_parent() -> None:
    for db in list(_handles):
        if db._idle_at_fork:
            db._idle_at_fork = False
            db.lock.release()


def _after_fork_in_child() -> None:
    global _signals_lock
    _signals_lock = threading.Lock()
    for s in list(_signals.values()):
        s._cond = threading.Condition()  # a parent's thread may have held it
        s._wakers = set()  # the parent's event loops
    for db in list(_handles):
        db._after_fork()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
