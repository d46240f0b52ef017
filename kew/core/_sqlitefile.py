"""One SQLite file that several processes use at once: WAL mode, the busy
timeout, the ``synchronous`` pragma.

Shared by the SQLite provider (:mod:`kew.embedded.sqlite`) and the SQLite
task store (:mod:`kew.task.store`), so that the task layer does not import a
provider.  Nothing here knows kew's tables.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

__all__ = ["SYNCHRONOUS", "enable_wal", "open_file"]

#: The values of ``PRAGMA synchronous`` that :func:`open_file` takes.
SYNCHRONOUS = ("off", "normal", "full", "extra")


def _doubling(first: float = 0.005, most: float = 0.1) -> Callable[[], float]:
    """Pauses of ``first`` seconds, doubling up to ``most``."""
    pause = first

    def next_pause() -> float:
        nonlocal pause
        current, pause = pause, min(pause * 2, most)
        return current

    return next_pause


def enable_wal(
    conn: sqlite3.Connection, timeout: float, pause: Callable[[], float] | None = None
) -> None:
    """Put the database in WAL mode, waiting up to ``timeout`` seconds for
    other connections.

    Changing the journal mode takes an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler, while another
    process opens or writes the same file: so this tries again, after
    ``pause()`` seconds each time (default: 5 ms, doubling up to 100 ms).
    A file already in WAL mode (the usual case, once its first user set it)
    needs no change at all.
    """
    deadline = time.monotonic() + timeout
    pause = pause or _doubling()
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
            time.sleep(pause())


def open_file(
    path: str,
    *,
    busy_timeout: float,
    synchronous: str,
    pause: Callable[[], float] | None = None,
) -> sqlite3.Connection:
    """A connection to the database file at ``path`` for use by several
    threads under the caller's lock (``check_same_thread`` off), in
    autocommit mode (the caller issues ``BEGIN``/``COMMIT``), waiting up to
    ``busy_timeout`` seconds for a lock, the file in WAL mode (see
    :func:`enable_wal`, which ``pause`` is passed to), and ``synchronous``
    one of :data:`SYNCHRONOUS`.  On an error the connection is closed."""
    if synchronous.lower() not in SYNCHRONOUS:
        raise ValueError(f"PRAGMA synchronous takes one of {SYNCHRONOUS}, not {synchronous!r}")
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        enable_wal(conn, busy_timeout, pause)
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn
