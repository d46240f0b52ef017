"""Batch bookkeeping: which imports of a POST are final, and was it reported.

Final outcomes arrive as messages (at least once, in any order, from any
worker).  Each is recorded once per (batch, task) — a redelivered outcome
changes nothing — and the batch is complete when it has as many final
outcomes as it has imports.  The report (the e-mails) is sent at least once:
a process *claims* it for a while, sends, then marks it sent; a claim whose
process died runs out and the next outcome of the batch (a redelivery) takes
it over.  One SQLite file in WAL mode, shared by the workers of a site.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_outcome (
    batch_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    target TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (batch_id, task_id)
);
CREATE TABLE IF NOT EXISTS batch (
    batch_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    completed_at INTEGER,
    claimed_until INTEGER NOT NULL DEFAULT 0,
    reported_at INTEGER
);
"""


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    target: str
    email: str
    status: str  # succeeded | failed
    error: str
    attempt: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BatchStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
        batch is complete (now or before) and its report is not sent yet."""
        now = _now_ms()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR IGNORE INTO batch (batch_id, size) VALUES (?, ?)", (batch_id, size)
                )
                db.execute(
                    "INSERT OR IGNORE INTO batch_outcome VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, task_id, target, email, status, error, attempt, now),
                )
                (done,) = db.execute(
                    "SELECT count(*) FROM batch_outcome WHERE batch_id = ?", (batch_id,)
                ).fetchone()
                complete = done >= size
                if complete:
                    db.execute(
                        "UPDATE batch SET completed_at = ? WHERE batch_id = ? "
                        "AND completed_at IS NULL",
                        (now, batch_id),
                    )
                (reported,) = db.execute(
                    "SELECT reported_at FROM batch WHERE batch_id = ?", (batch_id,)
                ).fetchone()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return bool(complete and reported is None)

    def claim_report(self, batch_id: str, lease_s: float = 120.0) -> bool:
        """Take the job of reporting a complete batch, unless it is reported
        or another process holds a live claim."""
        now = _now_ms()
        with self._lock:
            cur = self._db.execute(
                "UPDATE batch SET claimed_until = ? WHERE batch_id = ? AND completed_at IS NOT "
                "NULL AND reported_at IS NULL AND claimed_until <= ?",
                (now + int(lease_s * 1000), batch_id, now),
            )
            return cur.rowcount == 1

    def release_claim(self, batch_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE batch SET claimed_until = 0 WHERE batch_id = ?", (batch_id,))

    def mark_reported(self, batch_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE batch SET reported_at = ? WHERE batch_id = ?", (_now_ms(), batch_id)
            )

    def outcomes(self, batch_id: str) -> list[TaskOutcome]:
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, target, email, status, error, attempt FROM batch_outcome "
                "WHERE batch_id = ? ORDER BY at, task_id",
                (batch_id,),
            ).fetchall()
        return [TaskOutcome(*r) for r in rows]

    def is_complete(self, batch_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT completed_at FROM batch WHERE batch_id = ?", (batch_id,)
            ).fetchone()
        return row is not None and row[0] is not None

    def is_reported(self, batch_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT reported_at FROM batch WHERE batch_id = ?", (batch_id,)
            ).fetchone()
        return row is not None and row[0] is not None
