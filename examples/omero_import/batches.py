"""Batch bookkeeping on ``kew.idempotency``: which imports of a POST are
final, and whether the batch is reported.

Final outcomes arrive as messages (at least once, in any order, from any
worker).  Each is recorded once per (batch, task) with
:meth:`IdempotencyStore.atomic_once` under the key
``outcome:<batch>:<task>``: the outcome's row and the done mark commit in
one backend transaction, so a redelivered outcome changes nothing.  The
batch is complete when it has as many recorded outcomes as it has imports.

The report (the e-mails) is sent through
``IdempotencyStore.once("report:<batch>")``: a process claims the key
(a lease of ``[batches] report_lease`` seconds, renewed while it works),
sends, and the key is marked done.  A claim whose process died runs out and
the next outcome of the batch (a redelivery) takes it over; a send that
raised drops the claim.  The idempotency store is the one place that says
whether a batch was reported.

Where it lives: on the broker's own backend when its provider keeps
idempotency records (SQLite: the table ``omero_batch_outcome`` in the
broker's file, written in the done mark's transaction; Redis: a hash per
batch, written in the done mark's MULTI; memory: this process), otherwise on
``[batches] store``, the URL of one (``sqlite:///...``, ``redis://...``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

import kew
from kew.idempotency import DEFAULT_RETENTION, IdempotencyStore, StillClaimed, open_store
from kew.qchan.spi import ConfigError, Connector
from kew.qchan.spi.dedupe import DedupeCapable

#: The idempotency namespace of the bookkeeping (its keys: ``outcome:...``, ``report:...``).
NAMESPACE = "omero-import"


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    target: str
    email: str
    status: str  # succeeded | failed
    error: str
    attempt: int


def outcome_key(batch_id: str, task_id: str) -> str:
    return f"outcome:{batch_id}:{task_id}"


def report_key(batch_id: str) -> str:
    return f"report:{batch_id}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- where the outcomes' details are kept, per backend ------------------------


class _Ledger(Protocol):
    def write(self, handle: Any, batch_id: str, size: int, at: int, o: TaskOutcome) -> None:
        """Inside ``atomic_once``: write the outcome with ``handle``, the
        backend's transaction."""
        ...

    def read(self, batch_id: str) -> tuple[int, list[TaskOutcome]]:
        """The batch's size (0: nothing recorded) and its outcomes, in order."""
        ...

    def close(self) -> None: ...


class _Row(msgspec.Struct, array_like=True):
    size: int
    at: int
    target: str
    email: str
    status: str
    error: str
    attempt: int


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS omero_batch_outcome (
    batch_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    target TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (batch_id, task_id)
);
"""


class _SqliteLedger:
    """Rows in the broker's SQLite file, inserted by the effect on the
    ``sqlite3.Connection`` of the done mark's transaction."""

    def __init__(self, path: str, retain_ms: int | None) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SQLITE_SCHEMA)
        if retain_ms is not None:  # rows live as long as their done marks
            self._db.execute(
                "DELETE FROM omero_batch_outcome WHERE at < ?", (_now_ms() - retain_ms,)
            )

    def write(self, handle: Any, batch_id: str, size: int, at: int, o: TaskOutcome) -> None:
        db: sqlite3.Connection = handle
        db.execute(
            "INSERT OR IGNORE INTO omero_batch_outcome VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (batch_id, o.task_id, size, o.target, o.email, o.status, o.error, o.attempt, at),
        )

    def read(self, batch_id: str) -> tuple[int, list[TaskOutcome]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT size, task_id, target, email, status, error, attempt "
                "FROM omero_batch_outcome WHERE batch_id = ? ORDER BY at, task_id",
                (batch_id,),
            ).fetchall()
        size = max((r[0] for r in rows), default=0)
        return size, [TaskOutcome(*r[1:]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _RedisLedger:
    """A hash per batch (task id -> outcome), set by the effect on the
    pipeline in MULTI with the done mark; it expires with the marks.  Its
    key carries the namespace's hash tag, as the marks' keys do."""

    def __init__(self, client: Any, prefix: str, namespace: str, retain_ms: int | None) -> None:
        self._r = client
        self._base = f"{prefix}:omero:{{{namespace}}}:batch:"
        self._retain_ms = retain_ms

    def key(self, batch_id: str) -> str:
        return self._base + batch_id

    def write(self, handle: Any, batch_id: str, size: int, at: int, o: TaskOutcome) -> None:
        row = _Row(size, at, o.target, o.email, o.status, o.error, o.attempt)
        k = self.key(batch_id)
        handle.hsetnx(k, o.task_id, msgspec.json.encode(row))
        if self._retain_ms is not None:
            handle.pexpire(k, self._retain_ms)

    def read(self, batch_id: str) -> tuple[int, list[TaskOutcome]]:
        raw: dict[bytes, bytes] = self._r.hgetall(self.key(batch_id))
        rows = sorted(
            ((msgspec.json.decode(v, type=_Row), k.decode()) for k, v in raw.items()),
            key=lambda r: (r[0].at, r[1]),
        )
        size = max((r.size for r, _ in rows), default=0)
        return size, [
            TaskOutcome(t, r.target, r.email, r.status, r.error, r.attempt) for r, t in rows
        ]

    def close(self) -> None:
        pass


class _MemoryLedger:
    """This process's memory, shared by the services on one ``memory://`` broker."""

    _all: dict[str, dict[str, dict[str, tuple[_Row, str]]]] = {}
    _all_lock = threading.Lock()

    def __init__(self, broker: str) -> None:
        self._lock = _MemoryLedger._all_lock
        with self._lock:
            self._batches = _MemoryLedger._all.setdefault(broker, {})

    def write(self, handle: Any, batch_id: str, size: int, at: int, o: TaskOutcome) -> None:
        row = _Row(size, at, o.target, o.email, o.status, o.error, o.attempt)
        with self._lock:
            self._batches.setdefault(batch_id, {}).setdefault(o.task_id, (row, o.task_id))

    def read(self, batch_id: str) -> tuple[int, list[TaskOutcome]]:
        with self._lock:
            rows = sorted(self._batches.get(batch_id, {}).values(), key=lambda r: (r[0].at, r[1]))
        size = max((r.size for r, _ in rows), default=0)
        return size, [
            TaskOutcome(t, r.target, r.email, r.status, r.error, r.attempt) for r, t in rows
        ]

    def close(self) -> None:
        pass


def _ledger(conn: Connector, namespace: str, retain_ms: int | None) -> _Ledger:
    from kew.embedded.memory import MemoryConnector
    from kew.embedded.sqlite import SqliteConnector

    if isinstance(conn, SqliteConnector):
        return _SqliteLedger(conn.options.path, retain_ms)
    if isinstance(conn, MemoryConnector):
        return _MemoryLedger(conn.options.name)
    try:
        from kew_redis.provider import RedisConnector
    except ImportError:  # the redis extra is not installed
        pass
    else:
        if isinstance(conn, RedisConnector):
            return _RedisLedger(conn.redis, conn.options.prefix, namespace, retain_ms)
    raise ConfigError(
        f"{getattr(conn, 'url', conn)!r}: the OMERO batch bookkeeping keeps its records on "
        "SQLite, Redis or memory; set [batches] store to sqlite:///path or redis://host:port"
    )


# -- the bookkeeping -----------------------------------------------------------


class BatchStore:
    """Outcomes recorded once per (batch, task); reports sent through
    :attr:`idempotency` (see the module)."""

    def __init__(
        self, idempotency: IdempotencyStore, ledger: _Ledger, *, owns: Connector | None = None
    ) -> None:
        self.idempotency = idempotency
        self._ledger = ledger
        self._owns = owns

    @classmethod
    def open(
        cls,
        backend: Connector | str,
        *,
        lease: float = 120.0,
        namespace: str = NAMESPACE,
        retention: float | None = DEFAULT_RETENTION,
    ) -> BatchStore:
        """The bookkeeping on ``backend``: a connector (the broker's) or the
        URL of a store.  ``lease``: seconds a reporter's claim lasts without
        renewal (a dead reporter's runs out after it).  ``retention``:
        seconds the records are kept (a redelivery later than that counts
        again)."""
        conn = kew.connect(backend) if isinstance(backend, str) else backend
        try:
            if not isinstance(conn, DedupeCapable):
                raise ConfigError(
                    f"{getattr(conn, 'url', conn)!r} keeps no idempotency records; "
                    "give the batch bookkeeping a store URL: [batches] store = "
                    '"sqlite:///path" or "redis://host:port"'
                )
            retain_ms = None if retention is None else max(1, round(retention * 1000))
            ledger = _ledger(conn, namespace, retain_ms)
            idem = open_store(conn, namespace, lease=lease, retention=retention)
        except BaseException:
            if conn is not backend:
                conn.close()
            raise
        return cls(idem, ledger, owns=conn if conn is not backend else None)

    def close(self) -> None:
        self.idempotency.close()
        self._ledger.close()
        if self._owns is not None:
            self._owns.close()

    def record(
        self,
        batch_id: str,
        size: int,
        task_id: str,
        *,
        target: str,
        email: str,
        status: str,
        error: str = "",
        attempt: int = 0,
    ) -> bool:
        """Record a final outcome (once; repeats are ignored).  True when the
        batch is complete (now or before) and its report is not done yet."""
        o = TaskOutcome(task_id, target, email, status, error, attempt)
        at = _now_ms()
        self.idempotency.atomic_once(
            outcome_key(batch_id, task_id),
            lambda handle: self._ledger.write(handle, batch_id, size, at, o),
        )
        return self.is_complete(batch_id) and not self.is_reported(batch_id)

    def report(self, batch_id: str, send: Callable[[list[TaskOutcome]], object]) -> bool:
        """Call ``send(outcomes)`` under ``once("report:<batch>")`` unless the
        report is done.  True when it is done (by this call or before); False
        when another live process holds the claim.  If ``send`` raises, the
        claim is dropped and the error propagates."""
        try:
            with self.idempotency.once(report_key(batch_id), wait=0) as first:
                if first:
                    send(self.outcomes(batch_id))
        except StillClaimed:
            return False
        return True

    def outcomes(self, batch_id: str) -> list[TaskOutcome]:
        return self._ledger.read(batch_id)[1]

    def is_complete(self, batch_id: str) -> bool:
        size, outcomes = self._ledger.read(batch_id)
        return size > 0 and len(outcomes) >= size

    def is_reported(self, batch_id: str) -> bool:
        return self.idempotency.is_done(report_key(batch_id))
