"""A task store in PostgreSQL: several recorders and front ends on several hosts.

``open_store("postgresql://user@host/db?schema=kew")`` (or ``postgres://``)
opens a :class:`PostgresTaskStore`; everything but the ``schema`` option
(default ``kew``) is passed to libpq as is.  It keeps what
:class:`~kew.task.store.SqliteTaskStore` keeps, in three tables of that
schema, created when missing (and a column added since, ``cancel_requested_at``,
added to a schema made before): ``task`` (one row per task), ``task_output``
(chunks keyed by ``(task_id, attempt, run, seq)``) and ``task_worker``.

Concurrency: :meth:`PostgresTaskStore.apply` is one transaction.  It locks
the rows of the tasks its events touch (``SELECT ... FOR UPDATE``), runs the
shared :func:`~kew.task._rows.transition` on what they hold and writes the
results; for a task without a row it inserts the record its events make
from nothing, ``ON CONFLICT DO NOTHING`` (which waits for another
transaction inserting the same task), and when another recorder got there
first it locks that row and applies the events to it instead.  Locks and
inserts go in one order for everyone (byte order of the id).  So two
recorders applying events at once, in any interleaving, each build on the
other's committed rows and never overwrite them with what they read
before: per task, the outcome is that of applying the batches one after
the other.  Output chunks and heartbeats are upserts that a repeat leaves
alone.  A deadlock or serialization failure (which the lock order makes
rare) rolls the batch back and applies it again; so does a connection lost
mid-way, once, on a new connection.  Readers run single statements: they
see a batch whole or not at all.

PostgreSQL text cannot hold NUL characters: a NUL in an event's text is
stored as U+FFFD.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import psycopg
from msgspec.structs import replace
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from kew.qchan.spi.errors import BrokerUnavailable, ConfigError
from kew.qchan.spi.urls import redact
from kew.task._rows import COLUMNS, FINAL_SQL, Row, join_output, row_of, transition
from kew.task.model import TaskEvent, TaskRecord, WorkerRecord

__all__ = ["PostgresTaskStore"]

T = TypeVar("T")

#: The schema when the URL has no ``schema=`` option.
DEFAULT_SCHEMA = "kew"

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

#: Times a batch is applied again after a deadlock or serialization failure.
_RETRIES = 8

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.task (
    id TEXT COLLATE "C" PRIMARY KEY,
    queue TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    run BIGINT NOT NULL,
    rank INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    next_at BIGINT,
    last_error TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    cancel_requested_at BIGINT
);
ALTER TABLE {s}.task ADD COLUMN IF NOT EXISTS cancel_requested_at BIGINT;
CREATE INDEX IF NOT EXISTS task_created ON {s}.task (created_at, id);
CREATE INDEX IF NOT EXISTS task_cancel ON {s}.task (cancel_requested_at)
    WHERE cancel_requested_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_queue_created ON {s}.task (queue, created_at, id);
CREATE INDEX IF NOT EXISTS task_finished ON {s}.task (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.task_output (
    task_id TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    run BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt, run, seq)
);
CREATE TABLE IF NOT EXISTS {s}.task_worker (
    id TEXT COLLATE "C" PRIMARY KEY,
    queues TEXT NOT NULL,
    last_seen BIGINT NOT NULL
)
"""

_TABLES = ("task", "task_output", "task_worker")

_INSERT = """
INSERT INTO {s}.task (id, queue, status, attempt, run, rank, created_at, updated_at, started_at,
    finished_at, next_at, last_error, worker, cancel_requested_at)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::int[],
            %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[],
            %b::text[], %b::text[], %b::bigint[])
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

_LOCK = "SELECT {cols} FROM {s}.task WHERE id = ANY(%b::text[]) ORDER BY id FOR UPDATE"

_UPDATE = """
UPDATE {s}.task AS t SET queue = v.queue, status = v.status, attempt = v.attempt,
    run = v.run, rank = v.rank, created_at = v.created_at, updated_at = v.updated_at,
    started_at = v.started_at, finished_at = v.finished_at, next_at = v.next_at,
    last_error = v.last_error, worker = v.worker, cancel_requested_at = v.cancel_requested_at
FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::int[],
            %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[],
            %b::text[], %b::text[], %b::bigint[])
    AS v(id, queue, status, attempt, run, rank, created_at, updated_at, started_at,
         finished_at, next_at, last_error, worker, cancel_requested_at)
WHERE t.id = v.id
"""

_OUTPUT = """
INSERT INTO {s}.task_output (task_id, attempt, run, seq, text)
SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::text[])
ON CONFLICT DO NOTHING
"""

_WORKERS = """
INSERT INTO {s}.task_worker AS w (id, queues, last_seen)
SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])
ON CONFLICT (id) DO UPDATE SET queues = excluded.queues, last_seen = excluded.last_seen
WHERE excluded.last_seen >= w.last_seen
"""

_PRUNE_TASKS = """
WITH gone AS (
    SELECT id FROM {s}.task
    WHERE finished_at < %(before)s AND status IN ({final})
    ORDER BY id FOR UPDATE
), chunks AS (
    DELETE FROM {s}.task_output WHERE task_id IN (SELECT id FROM gone)
)
DELETE FROM {s}.task WHERE id IN (SELECT id FROM gone)
"""

_PRUNE_WORKERS = """
DELETE FROM {s}.task_worker WHERE id IN (
    SELECT id FROM {s}.task_worker WHERE last_seen < %s ORDER BY id FOR UPDATE
)
"""


def parse_url(url: str) -> tuple[str, str]:
    """``postgresql://...?schema=NAME&...`` -> (libpq conninfo without the
    ``schema`` option, schema name); a bad ``schema`` is a ConfigError."""
    base, _, query = url.partition("?")
    options = parse_qsl(query, keep_blank_values=True)
    schemas = [v for k, v in options if k == "schema"]
    if len(schemas) > 1:
        raise ConfigError(f"task store URL {redact(url)!r} gives the option schema twice")
    schema = schemas[0] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            f"task store URL {redact(url)!r}: schema={schema!r} is not a plain SQL name "
            "(letters, digits and _, not starting with a digit, at most 63)"
        )
    rest = [(k, v) for k, v in options if k != "schema"]
    return (f"{base}?{urlencode(rest)}" if rest else base), schema


def _lock_key(text: str) -> int:
    """A signed 64-bit advisory-lock key for ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), signed=True)


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _clean_event(ev: TaskEvent) -> TaskEvent:
    """``ev`` with no NUL in its text fields (PostgreSQL text cannot hold one)."""
    fields = (ev.task_id, ev.queue, ev.worker, ev.text, ev.error)
    if not any("\x00" in f for f in fields):
        return ev
    return replace(
        ev,
        task_id=_clean(ev.task_id),
        queue=_clean(ev.queue),
        worker=_clean(ev.worker),
        text=_clean(ev.text),
        error=_clean(ev.error),
    )


def _fold(row: Row | None, events: list[TaskEvent]) -> Row | None:
    """``row`` after ``events`` (one task's, in order); None if they change nothing."""
    changed = False
    for ev in events:
        new = transition(row, ev)
        if new is not None:
            row, changed = new, True
    return row if changed else None


def _columns(rows: Sequence[Row]) -> list[list[Any]]:
    """The rows as 14 column lists (for ``unnest``)."""
    cols: list[list[Any]] = [[] for _ in range(14)]
    for row in rows:
        r = row.record
        values = (
            r.id,
            r.queue,
            r.status,
            r.attempt,
            row.run,
            row.rank,
            r.created_at,
            r.updated_at,
            r.started_at,
            r.finished_at,
            r.next_at,
            r.last_error,
            r.worker,
            r.cancel_requested_at,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    return cols


class PostgresTaskStore:
    """Tasks in PostgreSQL (see the module): any number of recorders and
    readers on any number of hosts.  ``url``: ``postgresql://`` or
    ``postgres://``, libpq's URL with an optional ``schema=`` option.

    One connection (autocommit, opened at once, opened again when lost),
    used by one thread at a time.  ``connect_timeout`` (seconds) and the
    ``application_name`` apply unless the URL gives its own.
    """

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        self._conninfo, self.schema = parse_url(url)
        self.url = redact(url)
        try:
            given = conninfo_to_dict(self._conninfo)
        except psycopg.ProgrammingError as e:
            why = str(e).strip().replace(self._conninfo, redact(self._conninfo))
            raise ConfigError(f"task store URL {self.url!r}: {why}") from None
        #: what the URL does not say: give up connecting after ``connect_timeout``
        defaults: dict[str, Any] = {
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": "kew task store",
        }
        self._defaults = {k: v for k, v in defaults.items() if k not in given}
        self._lock = threading.Lock()
        self._closed = False
        s = sql.Identifier(self.schema)

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(s=s, cols=sql.SQL(COLUMNS), final=sql.SQL(FINAL_SQL))

        self._q_insert = q(_INSERT)
        self._q_lock = q(_LOCK)
        self._q_update = q(_UPDATE)
        self._q_output = q(_OUTPUT)
        self._q_workers = q(_WORKERS)
        self._q_prune_tasks = q(_PRUNE_TASKS)
        self._q_prune_workers = q(_PRUNE_WORKERS)
        self._q_get = q("SELECT {cols} FROM {s}.task WHERE id = %s")
        self._q_output_of = q(
            "SELECT attempt, run, text FROM {s}.task_output WHERE task_id = %s "
            "ORDER BY attempt, run, seq"
        )
        self._q_recent = q("SELECT {cols} FROM {s}.task ORDER BY created_at DESC, id DESC LIMIT %s")
        self._q_recent_queue = q(
            "SELECT {cols} FROM {s}.task WHERE queue = %s "
            "ORDER BY created_at DESC, id DESC LIMIT %s"
        )
        self._q_workers_all = q("SELECT id, queues, last_seen FROM {s}.task_worker ORDER BY id")
        self._q_cancel_marks = q(
            "SELECT id FROM {s}.task WHERE cancel_requested_at >= %s AND status NOT IN ({final}) "
            "ORDER BY cancel_requested_at, id LIMIT %s"
        )
        self._ddl = [q(statement) for statement in _DDL.split(";") if statement.strip()]
        self._conn: psycopg.Connection[Any] | None = None
        with self._lock:
            self._connection()  # fail now, not at the first event, if it cannot connect

    def __repr__(self) -> str:
        return f"PostgresTaskStore({self.url!r})"

    # -- connection ---------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._defaults)
        except psycopg.OperationalError as e:
            raise BrokerUnavailable(
                f"cannot connect to the task store {self.url}: {str(e).strip()}"
            ) from e
        try:
            self._create(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema and tables if missing (under an advisory lock, so
        that two processes starting at once do not collide; skipped when all
        exist, so a role that may only read and write them needs no CREATE)."""
        names = [sql.Identifier(self.schema, t).as_string(conn) for t in _TABLES]
        found = conn.execute(
            "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) AS u(n)",
            (names,),
        ).fetchone()
        if found is not None and found[0] and self._has_columns(conn):
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(f"kew:{self.schema}"),))
            for statement in self._ddl:
                conn.execute(statement)

    def _has_columns(self, conn: psycopg.Connection[Any]) -> bool:
        """Has the task table the columns added after the first release
        (``cancel_requested_at``)?  A schema made before gets them by DDL."""
        row = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'task' AND column_name = 'cancel_requested_at'",
            (self.schema,),
        ).fetchone()
        return row is not None and row[0] == 1

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn(connection)`` under the store's lock; again after a deadlock or
        serialization failure, and once on a new connection if it was lost."""
        with self._lock:
            reconnected = False
            tries = 0
            while True:
                conn = self._connection()
                try:
                    return fn(conn)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    tries += 1
                    if tries > _RETRIES:
                        raise
                    time.sleep(random.uniform(0, 0.01 * 2**tries))
                except psycopg.OperationalError as e:
                    if not conn.closed:
                        raise  # an error of the statement, not of the connection
                    self._conn = None
                    if reconnected:
                        raise BrokerUnavailable(
                            f"lost the connection to the task store {self.url}: {str(e).strip()}"
                        ) from e
                    reconnected = True

    # -- writing ------------------------------------------------------------------

    def apply(self, events: Sequence[TaskEvent]) -> None:
        """Apply a batch of events in one transaction (idempotent, any order;
        safe with other recorders applying at the same time)."""
        if not events:
            return
        workers: dict[str, tuple[str, int]] = {}
        task_events: list[TaskEvent] = []
        for ev in map(_clean_event, events):
            if ev.kind == "worker":
                old = workers.get(ev.worker)
                if old is None or old[1] <= ev.at:
                    workers[ev.worker] = (ev.text, ev.at)
            else:
                task_events.append(ev)
        self._run(lambda conn: self._apply(conn, task_events, workers))

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        events: list[TaskEvent],
        workers: dict[str, tuple[str, int]],
    ) -> None:
        with conn.transaction():
            if events:
                self._apply_tasks(conn, events)
            if workers:
                ids = sorted(workers)
                conn.execute(
                    self._q_workers,
                    (ids, [workers[i][0] for i in ids], [workers[i][1] for i in ids]),
                )

    def _apply_tasks(self, conn: psycopg.Connection[Any], events: list[TaskEvent]) -> None:
        by_task: dict[str, list[TaskEvent]] = {}
        outputs: dict[tuple[str, int, int, int], str] = {}
        for ev in events:
            by_task.setdefault(ev.task_id, []).append(ev)
            if ev.kind == "output":
                outputs.setdefault((ev.task_id, ev.attempt, ev.run, ev.seq), ev.text)
        pending = sorted(by_task)
        while pending:
            # the tasks with a row: lock it, apply the events to what it holds
            held = {r[0]: row_of(r) for r in conn.execute(self._q_lock, (pending,)).fetchall()}
            changed = [
                row for tid, old in held.items() if (row := _fold(old, by_task[tid])) is not None
            ]
            if changed:
                conn.execute(self._q_update, _columns(changed))
            # the others: insert the record their events make from nothing
            fresh = {tid: _fold(None, by_task[tid]) for tid in pending if tid not in held}
            new = [row for row in fresh.values() if row is not None]
            if not new:
                break
            inserted = {r[0] for r in conn.execute(self._q_insert, _columns(new)).fetchall()}
            # inserted by another recorder since the lock: lock it now (after its commit)
            pending = [r.record.id for r in new if r.record.id not in inserted]
        if outputs:
            keys = sorted(outputs)
            conn.execute(
                self._q_output,
                (
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [k[3] for k in keys],
                    [outputs[k] for k in keys],
                ),
            )

    def prune(self, older_than_ms: int) -> int:
        """Drop final tasks finished before ``older_than_ms`` (epoch ms) with their
        output, and workers not seen since, in one transaction; returns the tasks dropped."""

        def prune(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                n = conn.execute(self._q_prune_tasks, {"before": older_than_ms}).rowcount
                conn.execute(self._q_prune_workers, (older_than_ms,))
            return n

        return self._run(prune)

    # -- reading ------------------------------------------------------------------

    def _read(self, query: sql.Composed, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: conn.execute(query, args).fetchall())

    def get(self, task_id: str) -> TaskRecord | None:
        """The task's record; ``None`` if the store has never heard of it."""
        rows = self._read(self._q_get, (_clean(task_id),))
        return row_of(rows[0]).record if rows else None

    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]:
        """The task's output from character ``offset`` on, and the offset to ask for next."""
        rows = self._read(self._q_output_of, (_clean(task_id),))
        text = join_output(rows)
        return text[offset:], max(len(text), offset)

    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]:
        """The newest tasks first (by creation), of one ``queue`` if given."""
        if queue is None:
            rows = self._read(self._q_recent, (limit,))
        else:
            rows = self._read(self._q_recent_queue, (_clean(queue), limit))
        return [row_of(r).record for r in rows]

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
        :meth:`TaskStore.search <kew.task.store.TaskStore.search>`), in one query."""
        where: list[sql.Composable] = []
        args: list[object] = []
        filters: list[tuple[str, object]] = [
            ("queue = ANY(%s::text[])", [_clean(q) for q in queues] if queues else None),
            ("status = ANY(%s::text[])", [_clean(x) for x in statuses] if statuses else None),
            ("created_at >= %s", since),
            ("created_at < %s", until),
            ("updated_at >= %s", updated_since),
            ("strpos(lower(last_error), lower(%s)) > 0", _clean(error) if error else None),
            ("worker = %s", _clean(worker) if worker else None),
        ]
        for clause, value in filters:
            if value is not None:
                where.append(sql.SQL(clause))
                args.append(value)
        query = sql.SQL("SELECT {cols} FROM {s}.task {where} ").format(
            cols=sql.SQL(COLUMNS),
            s=sql.Identifier(self.schema),
            where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        ) + sql.SQL("ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s")
        rows = self._read(query, (*args, limit, offset))
        return [row_of(r).record for r in rows]

    def cancel_marks(self, since: int, limit: int = 10_000) -> list[str]:
        """The ids of the tasks not final whose cancel was asked for at or after
        ``since`` (see :meth:`TaskStore.cancel_marks <kew.task.store.TaskStore.cancel_marks>`)."""
        return [str(r[0]) for r in self._read(self._q_cancel_marks, (since, limit))]

    def workers(self) -> list[WorkerRecord]:
        """The workers seen through their heartbeats, by id."""
        rows = self._read(self._q_workers_all)
        return [WorkerRecord(i, q, s) for i, q, s in rows]

    def close(self) -> None:
        """Close the connection; the store cannot be used after."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
