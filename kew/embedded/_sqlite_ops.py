"""The SQLite provider's writes, each run on the connection of a transaction
the caller holds: declaring and deleting queues, and a consumer's claims,
settles, lease renewals and hand-backs (:class:`Claims`).

Shared by the sync objects (:mod:`kew.embedded.sqlite`), which run them in
transactions of their own, and the native async route
(:mod:`kew.embedded._sqlite_aio`), whose writer thread runs whatever is
waiting in one transaction (:mod:`kew.embedded._sqlite_group`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from kew.embedded._sqlite_rows import ROW, encode_headers, int_or, not_due, read
from kew.qchan.spi import Delivery, Message, now_ms
from kew.qchan.spi.wire import Malformed

__all__ = ["Claims", "declare", "delete"]

log = logging.getLogger("kew.sqlite")


def declare(c: sqlite3.Connection, queue: str) -> None:
    c.execute("INSERT OR IGNORE INTO kew_queue (name) VALUES (?)", (queue,))


def delete(c: sqlite3.Connection, queue: str) -> None:
    c.execute("DELETE FROM kew_message WHERE queue = ?", (queue,))
    c.execute("DELETE FROM kew_dead WHERE queue = ?", (queue,))
    c.execute("DELETE FROM kew_queue WHERE name = ?", (queue,))


_ACK = "DELETE FROM kew_message WHERE seq = ? AND owner = ?"
_DEAD = (
    "INSERT INTO kew_dead (queue, id, body, headers, count, reason, dead_at) "
    "SELECT queue, CAST(id AS TEXT), CAST(body AS BLOB), headers, count, ?, ? "
    "FROM kew_message WHERE seq = ? AND owner = ?"
)
# Back at the head of the queue, and the hand-back is not counted.
_HAND_BACK = (
    "UPDATE kew_message SET avail_at = 0, owner = NULL, count = count - 1 "
    "WHERE seq = ? AND owner = ?"
)
_RENEW = "UPDATE kew_message SET avail_at = ? WHERE seq = ? AND owner = ?"


class Claims:
    """The statements of one consumer of ``queue``: it claims rows by
    setting ``owner`` to its token and ``avail_at`` to the end of a lease of
    ``lease_ms``, and settles only rows it still owns.  Each method runs on
    ``c``, inside the caller's write transaction (or, for one statement,
    in autocommit)."""

    def __init__(self, queue: str, owner: str, lease_ms: int) -> None:
        self.queue = queue
        self.owner = owner
        self.lease_ms = lease_ms

    def claim(self, c: sqlite3.Connection, count: int) -> list[Delivery]:
        """Claim up to ``count`` due rows, oldest first; a row kew cannot
        read is dead-lettered at once with the reason, and is not returned."""
        now = now_ms()
        good: list[Delivery] = []
        self._bury_undue(c, count)
        claimed = c.execute(
            "UPDATE kew_message SET avail_at = ?, owner = ?, count = count + 1 "
            "WHERE seq IN (SELECT seq FROM kew_message WHERE queue = ? AND avail_at <= ? "
            "ORDER BY avail_at, seq LIMIT ?) "
            f"RETURNING {ROW}, count",
            (now + self.lease_ms, self.owner, self.queue, now, count),
        ).fetchall()
        claimed.sort()
        dead: list[tuple[int, Message, int, Malformed]] = []
        for row in claimed:
            seq, n = row[0], int_or(row[6], 1)
            message, problem = read(row, f"sqlite-{seq}")
            if problem is None:
                good.append(Delivery(message, max(n, 1), seq))
            else:
                dead.append((seq, message, n, problem))
        self._bury(c, dead)
        return good

    def _bury_undue(self, c: sqlite3.Connection, count: int) -> None:
        """Dead-letter rows whose ``avail_at`` is text, bytes (SQLite sorts
        them after every number) or NULL (a table made without NOT NULL):
        never due, they would wait for ever.  (Two index searches: an OR
        would scan the queue.)"""
        undue = c.execute(
            f"SELECT {ROW}, count, typeof(avail_at), CAST(avail_at AS BLOB) FROM kew_message "
            "WHERE seq IN (SELECT seq FROM kew_message WHERE queue = ?1 AND avail_at >= '' "
            "UNION ALL SELECT seq FROM kew_message WHERE queue = ?1 AND avail_at IS NULL) "
            "LIMIT ?2",
            (self.queue, count),
        ).fetchall()
        self._bury(
            c,
            [
                (row[0], read(row, f"sqlite-{row[0]}")[0], int_or(row[6], 0), not_due(*row[7:9]))
                for row in undue
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
                self.queue,
                message.id,
                problem,
            )
        c.executemany(
            "INSERT INTO kew_dead (queue, id, body, headers, count, reason, dead_at) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (self.queue, m.id, m.body, encode_headers(m.headers), n, str(problem), now)
                for _, m, n, problem in dead
            ],
        )
        c.executemany("DELETE FROM kew_message WHERE seq = ?", [(seq,) for seq, *_ in dead])

    def next_due(self, c: sqlite3.Connection) -> float | None:
        """Seconds until the next delayed row of the queue is due (None:
        there is none)."""
        (due,) = c.execute(
            "SELECT MIN(avail_at) FROM kew_message WHERE queue = ? AND avail_at < ''",
            (self.queue,),
        ).fetchone()
        return None if not isinstance(due, int | float) else (due - now_ms()) / 1000

    def ack(self, c: sqlite3.Connection, seqs: Sequence[int]) -> None:
        c.executemany(_ACK, [(seq, self.owner) for seq in seqs])

    def dead_letter(self, c: sqlite3.Connection, seq: int, reason: str) -> None:
        """(Two statements: run in a transaction.)"""
        c.execute(_DEAD, (reason, now_ms(), seq, self.owner))
        c.execute(_ACK, (seq, self.owner))

    def hand_back(self, c: sqlite3.Connection, seqs: Sequence[int]) -> None:
        """Release rows: due at once, at the head of the queue, the
        delivery not counted."""
        c.executemany(_HAND_BACK, [(seq, self.owner) for seq in seqs])

    def renew(self, c: sqlite3.Connection, seqs: Sequence[int]) -> None:
        """Extend the leases of the rows still owned."""
        until = now_ms() + self.lease_ms
        c.executemany(_RENEW, [(until, seq, self.owner) for seq in seqs])
