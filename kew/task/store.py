"""Task stores: where task status and output are kept for anyone to read.

Workers never write here: they send :class:`TaskEvent` messages, and a
*recorder* (``App.recorder()``, ``kew recorder``, or ``kew worker
--record``) applies them with :meth:`TaskStore.apply`.  Applying is
idempotent and tolerates any order:

* a task's status moves only forward, by ``(attempt, run, STATUS_RANK)``:
  a late or repeated event never takes it back; a final status stays final
  unless a later attempt or run starts (a requeued dead letter, a task
  redelivered after its worker died between its last event and its ack);
* output chunks are keyed by ``(task_id, attempt, run, seq)``: a repeated
  chunk is stored once, and :meth:`TaskStore.output` returns them in order,
  with a header line before each retry (``--- attempt 2 ---``);
* a ``cancel-requested`` event marks the task (``cancel_requested_at``, the
  first request's time) without changing its status; workers read the marks
  (:meth:`TaskStore.cancel_marks`) and end the task ``cancelled``.

:class:`SqliteTaskStore` (WAL; any number of processes on one machine, or
a file system that supports SQLite locking) and :class:`MemoryTaskStore`
(one process, tests).  ``open_store("sqlite:///path")`` / ``"memory://"``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from kew.core._sqlitefile import enable_wal
from kew.task._rows import (
    COLUMNS,
    FINAL_SQL,
    STATUS_KINDS,
    Row,
    join_output,
    params_of,
    row_of,
    transition,
)
from kew.task.model import TaskEvent, TaskRecord, WorkerRecord

__all__ = [
    "STATUS_KINDS",
    "MemoryTaskStore",
    "SqliteTaskStore",
    "TaskStore",
    "join_output",
    "open_store",
    "transition",
]


@runtime_checkable
class TaskStore(Protocol):
    """Where task status and output are kept for anyone to read (see the module).

    A recorder applies the task events to it; the REST front end, the CLI and
    :meth:`App.status <kew.task.App.status>` read it.  :func:`open_store` opens one by URL.
    """

    def apply(self, events: Sequence[TaskEvent]) -> None:
        """Apply a batch of events (idempotent, any order)."""
        ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; ``None`` if the store has never heard of it."""
        ...

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset
        to ask for next."""
        ...

    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]:
        """The newest tasks first (by creation)."""
        ...

    def search(
        self,
        *,
        queues: Sequence[str] | None = None,
        statuses: Sequence[str] | None = None,
        since: int | None = None,
        until: int | None = None,
        updated_since: int | None = None,
        error: str | None = None,
        worker: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """The tasks every given filter selects, newest first (the REST
        ``GET /tasks`` filters and the page's search).

        A filter that is ``None`` (or an empty sequence, or ``""``) selects
        every task; the others all apply (AND):

        * ``queues``: ``queue`` is one of them;
        * ``statuses``: ``status`` is one of them (``queued``, ``running``,
          ``retry-scheduled``, ``succeeded``, ``failed``, ``cancelled``);
        * ``since`` / ``until``: epoch ms bounds of ``created_at``,
          ``since <= created_at < until``;
        * ``updated_since``: ``updated_at >= updated_since`` (the charts ask
          for every task that started or finished in their window this way);
        * ``error``: ``last_error`` contains it, case-insensitively (ASCII
          case folding is enough: ``lower()`` on both sides in SQL); a literal
          substring, no wildcards (``%`` and ``_`` are plain characters);
        * ``worker``: ``worker`` equals it.

        Order: ``created_at`` descending, then ``id`` descending (as
        :meth:`recent`); then ``offset`` rows are skipped and at most
        ``limit`` returned (``limit >= 1``, ``offset >= 0``).
        """
        ...

    def cancel_marks(self, since: int, limit: int = 10_000) -> list[str]:
        """The ids of the tasks not final whose cancel was asked for at or
        after ``since`` (epoch ms), oldest request first, at most ``limit``:
        what a worker must not run (see docs/tasks.md, "Cancel")."""
        ...

    def workers(self) -> list[WorkerRecord]:
        """The workers seen through their heartbeats, by id."""
        ...

    def prune(self, older_than_ms: int) -> int:
        """Drop final tasks finished before ``older_than_ms`` (epoch ms) with
        their output, and workers not seen since; returns the tasks dropped."""
        ...

    def close(self) -> None:
        """Release the store's resources (its database connection)."""
        ...


# -- memory -------------------------------------------------------------------


class MemoryTaskStore:
    """A store in this process's memory (tests, single-process apps)."""

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, Row] = {}
        self._output: dict[str, dict[tuple[int, int, int], str]] = {}
        self._workers: dict[str, WorkerRecord] = {}

    def apply(self, events: Sequence[TaskEvent]) -> None:
        """Apply a batch of events (idempotent, any order)."""
        with self._lock:
            for ev in events:
                if ev.kind == "worker":
                    old = self._workers.get(ev.worker)
                    if old is None or old.last_seen <= ev.at:
                        self._workers[ev.worker] = WorkerRecord(ev.worker, ev.text, ev.at)
                    continue
                new = transition(self._rows.get(ev.task_id), ev)
                if new is not None:
                    self._rows[ev.task_id] = new
                if ev.kind == "output":
                    self._output.setdefault(ev.task_id, {}).setdefault(
                        (ev.attempt, ev.run, ev.seq), ev.text
                    )

    def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; ``None`` if the store has never heard of it."""
        with self._lock:
            row = self._rows.get(task_id)
        return row.record if row else None

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset to ask for next."""
        with self._lock:
            chunks = sorted(self._output.get(task_id, {}).items())
        text = join_output((a, r, t) for (a, r, _), t in chunks)
        return text[offset:], max(len(text), offset)

    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]:
        """The newest tasks first (by creation), of one ``queue`` if given."""
        with self._lock:
            records = [r.record for r in self._rows.values()]
        if queue is not None:
            records = [r for r in records if r.queue == queue]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records[:limit]

    def search(
        self,
        *,
        queues: Sequence[str] | None = None,
        statuses: Sequence[str] | None = None,
        since: int | None = None,
        until: int | None = None,
        updated_since: int | None = None,
        error: str | None = None,
        worker: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """The tasks every given filter selects, newest first (see
        :meth:`TaskStore.search`)."""
        with self._lock:
            records = [r.record for r in self._rows.values()]
        needle = error.lower() if error else ""
        hits = [
            r
            for r in records
            if (not queues or r.queue in queues)
            and (not statuses or r.status in statuses)
            and (since is None or r.created_at >= since)
            and (until is None or r.created_at < until)
            and (updated_since is None or r.updated_at >= updated_since)
            and (not needle or needle in r.last_error.lower())
            and (not worker or r.worker == worker)
        ]
        hits.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return hits[offset : offset + limit]

    def cancel_marks(self, since: int, limit: int = 10_000) -> list[str]:
        """The ids of the tasks not final whose cancel was asked for at or after
        ``since`` (see :meth:`TaskStore.cancel_marks`)."""
        with self._lock:
            marked = [
                (r.record.cancel_requested_at, tid)
                for tid, r in self._rows.items()
                if r.record.cancel_requested_at is not None
                and r.record.cancel_requested_at >= since
                and not r.record.final
            ]
        return [tid for _, tid in sorted(marked)[:limit]]

    def workers(self) -> list[WorkerRecord]:
        """The workers seen through their heartbeats, by id."""
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.id)

    def prune(self, older_than_ms: int) -> int:
        """Drop final tasks finished before ``older_than_ms`` (epoch ms) with their
        output, and workers not seen since; returns the tasks dropped."""
        with self._lock:
            gone = [
                tid
                for tid, row in self._rows.items()
                if row.record.final and (row.record.finished_at or 0) < older_than_ms
            ]
            for tid in gone:
                del self._rows[tid]
                self._output.pop(tid, None)
            for orphan in [t for t in self._output if t not in self._rows]:
                del self._output[orphan]
            for wid in [w for w, rec in self._workers.items() if rec.last_seen < older_than_ms]:
                del self._workers[wid]
        return len(gone)

    def close(self) -> None:
        """Nothing to release: the records stay until the object is dropped."""
        pass


# -- SQLite -------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kew_task (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    run INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    next_at INTEGER,
    last_error TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    cancel_requested_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kew_task_created ON kew_task (created_at);
CREATE INDEX IF NOT EXISTS kew_task_queue_created ON kew_task (queue, created_at);
CREATE INDEX IF NOT EXISTS kew_task_finished ON kew_task (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS kew_task_output (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt, run, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kew_task_worker (
    id TEXT PRIMARY KEY,
    queues TEXT NOT NULL,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;
"""

#: Added after the first release: a file made before gets it by ALTER TABLE.
_CANCEL_COLUMN = "ALTER TABLE kew_task ADD COLUMN cancel_requested_at INTEGER"
_CANCEL_INDEX = (
    "CREATE INDEX IF NOT EXISTS kew_task_cancel ON kew_task (cancel_requested_at) "
    "WHERE cancel_requested_at IS NOT NULL"
)


class SqliteTaskStore:
    """Tasks in an SQLite file (WAL, ``busy_timeout``): several processes
    may read and apply at once."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        if str(path) != ":memory:" and self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(
                f"cannot open the task store {self.path}: "
                f"directory {self.path.parent} does not exist"
            )
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        enable_wal(self._db, busy_timeout)
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(kew_task)")}
            if "cancel_requested_at" not in columns:
                self._db.execute(_CANCEL_COLUMN)
            self._db.execute(_CANCEL_INDEX)
            self._db.execute("COMMIT")

    def __repr__(self) -> str:
        return f"SqliteTaskStore({str(self.path)!r})"

    def apply(self, events: Sequence[TaskEvent]) -> None:
        """Apply a batch of events in one transaction (idempotent, any order)."""
        if not events:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                rows: dict[str, Row | None] = {}
                changed: set[str] = set()
                outputs: list[tuple[str, int, int, int, str]] = []
                workers: list[tuple[str, str, int]] = []
                for ev in events:
                    if ev.kind == "worker":
                        workers.append((ev.worker, ev.text, ev.at))
                        continue
                    if ev.kind == "output":
                        outputs.append((ev.task_id, ev.attempt, ev.run, ev.seq, ev.text))
                    if ev.task_id not in rows:
                        raw = db.execute(
                            f"SELECT {COLUMNS} FROM kew_task WHERE id = ?", (ev.task_id,)
                        ).fetchone()
                        rows[ev.task_id] = row_of(raw) if raw else None
                    new = transition(rows[ev.task_id], ev)
                    if new is not None:
                        rows[ev.task_id] = new
                        changed.add(ev.task_id)
                for tid in changed:
                    row = rows[tid]
                    assert row is not None
                    db.execute(
                        f"INSERT OR REPLACE INTO kew_task ({COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        params_of(row),
                    )
                if outputs:
                    db.executemany(
                        "INSERT OR IGNORE INTO kew_task_output (task_id, attempt, run, seq, text) "
                        "VALUES (?, ?, ?, ?, ?)",
                        outputs,
                    )
                if workers:
                    db.executemany(
                        "INSERT INTO kew_task_worker (id, queues, last_seen) VALUES (?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET queues = excluded.queues, "
                        "last_seen = excluded.last_seen WHERE excluded.last_seen >= last_seen",
                        workers,
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; ``None`` if the store has never heard of it."""
        rows = self._read(f"SELECT {COLUMNS} FROM kew_task WHERE id = ?", (task_id,))
        return row_of(rows[0]).record if rows else None  # type: ignore[arg-type]

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset to ask for next."""
        rows = self._read(
            "SELECT attempt, run, text FROM kew_task_output WHERE task_id = ? "
            "ORDER BY attempt, run, seq",
            (task_id,),
        )
        text = join_output(rows)  # type: ignore[arg-type]
        return text[offset:], max(len(text), offset)

    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]:
        """The newest tasks first (by creation), of one ``queue`` if given."""
        if queue is None:
            rows = self._read(
                f"SELECT {COLUMNS} FROM kew_task ORDER BY created_at DESC, id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = self._read(
                f"SELECT {COLUMNS} FROM kew_task WHERE queue = ? "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (queue, limit),
            )
        return [row_of(r).record for r in rows]  # type: ignore[arg-type]

    def search(
        self,
        *,
        queues: Sequence[str] | None = None,
        statuses: Sequence[str] | None = None,
        since: int | None = None,
        until: int | None = None,
        updated_since: int | None = None,
        error: str | None = None,
        worker: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """The tasks every given filter selects, newest first (see
        :meth:`TaskStore.search`), in one query."""
        where: list[str] = []
        args: list[object] = []
        for column, values in (("queue", queues), ("status", statuses)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        for clause, value in (
            ("created_at >= ?", since),
            ("created_at < ?", until),
            ("updated_at >= ?", updated_since),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        if error:
            where.append("instr(lower(last_error), lower(?)) > 0")
            args.append(error)
        if worker:
            where.append("worker = ?")
            args.append(worker)
        sql = f"SELECT {COLUMNS} FROM kew_task"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        rows = self._read(sql, (*args, limit, offset))
        return [row_of(r).record for r in rows]  # type: ignore[arg-type]

    def cancel_marks(self, since: int, limit: int = 10_000) -> list[str]:
        """The ids of the tasks not final whose cancel was asked for at or after
        ``since`` (see :meth:`TaskStore.cancel_marks`)."""
        rows = self._read(
            "SELECT id FROM kew_task WHERE cancel_requested_at >= ? "
            f"AND status NOT IN ({FINAL_SQL}) ORDER BY cancel_requested_at, id LIMIT ?",
            (since, limit),
        )
        return [str(r[0]) for r in rows]

    def workers(self) -> list[WorkerRecord]:
        """The workers seen through their heartbeats, by id."""
        rows = self._read("SELECT id, queues, last_seen FROM kew_task_worker ORDER BY id")
        return [WorkerRecord(str(i), str(q), int(s)) for i, q, s in rows]  # type: ignore[call-overload]

    def prune(self, older_than_ms: int) -> int:
        """Drop final tasks finished before ``older_than_ms`` (epoch ms) with their
        output, and workers not seen since, in one transaction; returns the tasks dropped."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "DELETE FROM kew_task_output WHERE task_id IN (SELECT id FROM kew_task "
                    f"WHERE finished_at < ? AND status IN ({FINAL_SQL}))",
                    (older_than_ms,),
                )
                n = db.execute(
                    f"DELETE FROM kew_task WHERE finished_at < ? AND status IN ({FINAL_SQL})",
                    (older_than_ms,),
                ).rowcount
                db.execute("DELETE FROM kew_task_worker WHERE last_seen < ?", (older_than_ms,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(n)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()


def open_store(url: str) -> TaskStore:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path``, ``memory://``,
    or ``postgresql://user@host:5432/db?schema=kew`` (also ``postgres://``: a
    :class:`~kew.task._pgstore.PostgresTaskStore` that recorders and readers on
    several hosts share; needs ``pip install 'ome-kew[postgres]'``)."""
    if url in ("memory://", "memory:"):
        return MemoryTaskStore()
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep:
        path = rest[1:] if rest.startswith("/") else rest
        path = path.split("?", 1)[0]
        if not path:
            raise ValueError(
                f"task store URL {url!r} names no file: use sqlite:///path/to/tasks.sqlite3"
            )
        return SqliteTaskStore(path)
    if scheme in ("postgresql", "postgres") and sep:
        from kew.connect import install_hint
        from kew.qchan.spi.errors import ProviderNotFound

        try:
            from kew.task._pgstore import PostgresTaskStore
        except ImportError as e:
            raise ProviderNotFound(
                f"the PostgreSQL task store cannot be imported: {e}; "
                f"install it with: {install_hint('postgres')}"
            ) from None
        return PostgresTaskStore(url)
    raise ValueError(
        f"unknown task store URL {url!r}: use sqlite:///path (relative), "
        "sqlite:////path (absolute), postgresql://host/db?schema=kew or memory://"
    )
