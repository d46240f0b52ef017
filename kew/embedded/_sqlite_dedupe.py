"""The SQLite provider's dedupe store for :mod:`kew.idempotency`
(``SqliteConnector.dedupe_store``): claims and done marks in the table
``kew_once`` of the queues' file."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from kew.embedded._sqlite_db import Db
from kew.qchan.spi import now_ms
from kew.qchan.spi.dedupe import ClaimResult

__all__ = ["SqliteDedupeStore"]

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

    def __init__(self, db: Db, namespace: str) -> None:
        self.namespace = namespace
        self._db = db
        db.script(_ONCE_SCHEMA)

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
