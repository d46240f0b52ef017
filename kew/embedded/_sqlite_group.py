"""Group commit for the SQLite provider: the writes waiting at one moment,
however many threads or coroutines asked for them, go into one transaction
(one ``fsync``).

A :class:`Job` is one caller's part: rows to insert (a send), a function
run on the transaction's connection (a claim, a settle, a renewal), or a
function run by itself between transactions (browsing, closing).  A
:class:`GroupCommit` owns one connection to the file and commits jobs in
groups:

* **Sync callers** (:meth:`GroupCommit.run`, the sync producer): a caller
  adds its job; if nobody is committing it commits everything waiting, its
  own job included, and wakes the others; else it waits for the commit
  under way and, if its job is still waiting then, commits the next group
  itself (leader and followers: no thread of its own, and a lone caller
  commits at once).  Each call returns once the transaction that holds its
  job has committed: a send is durable when ``send`` returns.
* **Coroutines** (:meth:`GroupCommit.submit`, the native async route) add
  a job and await its future.  A writer thread of the group (started on
  the first submit) commits whatever waits: it is woken once per turn of
  the loop, at the next turn, so that the jobs of one turn (a thousand
  sends started together) make one group.  It resolves each future on its
  loop once its transaction committed, through one
  ``loop.call_soon_threadsafe`` per loop at a time and at most
  ``RESOLVE_EACH`` futures per turn (timers fire between turns).  No
  coroutine ever waits on the file's lock.

The transaction is durable (``PRAGMA synchronous`` as the URL's ``sync``)
when it holds a send, else ``NORMAL`` (claims and settles: a power cut
means a redelivery).  If a job's statements fail, the transaction is rolled
back and the group run again with each job in a savepoint of its own: that
job gets its error, the others commit.  An error of the transaction itself
(the lock not had within ``busy_timeout``, a full disk) is every job's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from kew.embedded._sqlite_db import Db, Signal
from kew.embedded._sqlite_rows import INSERT

__all__ = ["Closed", "GroupCommit", "Job"]

log = logging.getLogger("kew.sqlite")


class Closed(RuntimeError):
    """The connector (or producer) that owns the group was closed."""


class Job:
    """One caller's write: ``rows`` to insert into ``kew_message`` (a send:
    durable), or ``write(connection)`` in the group's transaction, or
    ``alone()`` by itself after it.  ``notify``: wake this process's
    consumers of the file once committed.  ``after(job)`` runs on the
    committing thread once :attr:`result` or :attr:`error` is known, before
    the caller hears (it must not block)."""

    __slots__ = (
        "after",
        "alone",
        "durable",
        "error",
        "finished",
        "future",
        "notify",
        "result",
        "rows",
        "write",
    )

    def __init__(
        self,
        *,
        rows: Sequence[tuple[Any, ...]] = (),
        write: Callable[[sqlite3.Connection], Any] | None = None,
        alone: Callable[[], Any] | None = None,
        notify: bool = False,
        after: Callable[[Job], None] | None = None,
    ) -> None:
        self.rows = rows
        self.write = write
        self.alone = alone
        self.durable = bool(rows)
        self.notify = notify or bool(rows)
        self.after = after
        self.future: asyncio.Future[Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False


#: Futures resolved per turn of a loop: the coroutines they wake run in
#: the next turn, and timers fire between turns (groups of 1,000 sends do
#: not hold the loop for the time 1,000 coroutines take).
RESOLVE_EACH = 64


class _Loop:
    """A group's link with one event loop.  Jobs submitted during a turn
    of the loop wake the writer once, at the next turn (so that a burst of
    sends is one group, not a race with the writer); the futures of jobs
    done are resolved at most ``RESOLVE_EACH`` per turn."""

    __slots__ = ("done", "kick", "lock", "loop", "resolving")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.kick = False  # a wake-up of the writer is scheduled (the loop's thread only)
        self.lock = threading.Lock()
        self.done: deque[Job] = deque()
        self.resolving = False

    def resolve(self, jobs: Sequence[Job]) -> None:
        """(Any thread.)"""
        with self.lock:
            self.done.extend(jobs)
            if self.resolving:
                return
            self.resolving = True
        with suppress(RuntimeError):  # its loop is closed: nobody awaits them any more
            self.loop.call_soon_threadsafe(self._turn)

    def _turn(self) -> None:
        with self.lock:
            now = [self.done.popleft() for _ in range(min(RESOLVE_EACH, len(self.done)))]
            self.resolving = bool(self.done)
        if self.resolving:
            self.loop.call_soon(self._turn)
        for job in now:
            future = job.future
            if future is None or future.done():
                continue
            if job.error is not None:
                future.set_exception(job.error)
            else:
                future.set_result(job.result)


class GroupCommit:
    """Commits jobs in groups on one connection (``open_db()``, opened on
    first use); ``sync`` is the ``PRAGMA synchronous`` of a group holding a
    send.  Thread-safe; :meth:`submit` from any event loop."""

    def __init__(self, open_db: Callable[[], Db], sync: str, signal: Signal, name: str) -> None:
        self._open_db = open_db
        self._db: Db | None = None
        self._sync = sync
        self._mode: str | None = None  # the connection's PRAGMA synchronous, when known
        self._signal = signal
        self._name = name
        self._new_conditions()
        self._pending: list[Job] = []
        self._leading = False
        self._closed = False
        self._writer: threading.Thread | None = None
        self._writer_idle = False  # the writer waits on _work, nobody has woken it yet
        self._loops: dict[asyncio.AbstractEventLoop, _Loop] = {}  # under the lock
        #: Transactions committed so far (a statistic: tests, benchmarks).
        self.transactions = 0
        _groups.add(self)

    def __repr__(self) -> str:
        return f"GroupCommit({self._name!r})"

    def _new_conditions(self) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # a group committed: callers of run() look
        self._work = threading.Condition(lock)  # jobs or a close: the writer looks

    def _wake_writer(self) -> None:
        """(Hold the lock.)  Once per wait: a submit costs no system call
        while the writer is busy or already woken."""
        if self._writer_idle:
            self._writer_idle = False
            self._work.notify()

    # -- callers ------------------------------------------------------------

    def run(self, job: Job) -> Any:
        """Commit ``job`` (leading a group, or in the one a caller leads);
        its result once its transaction committed, or raise its error."""
        with self._cond:
            self._check_open()
            self._pending.append(job)
            while not job.finished:
                if self._leading:
                    self._cond.wait()
                else:
                    self._lead()
        if job.error is not None:
            raise job.error
        return job.result

    def submit(self, job: Job, *, last: bool = False) -> None:
        """Add ``job`` for the writer thread, without waiting; its
        :attr:`Job.future` (if any) is resolved on its loop.  From a
        coroutine, the writer is woken at the loop's next turn, with the
        other jobs of this turn.  ``last``: nothing may be added after it
        (the group closes)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._cond:
            self._check_open()
            self._pending.append(job)
            if last:
                self._closed = True
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name=f"kew-sqlite-writer-{self._name}"[:60]
                )
                self._writer.daemon = True
                self._writer.start()
            if loop is None:
                self._wake_writer()
                return
            link = self._link(loop)
        if not link.kick:
            link.kick = True
            loop.call_soon(self._kick, link)

    def _kick(self, link: _Loop) -> None:
        link.kick = False
        with self._cond:
            self._wake_writer()

    async def call(self, job: Job, *, last: bool = False) -> Any:
        """:meth:`submit`, then await the job's result."""
        job.future = asyncio.get_running_loop().create_future()
        self.submit(job, last=last)
        return await job.future

    def close(self) -> None:
        """No more jobs; close the connection (after a group under way)."""
        with self._cond:
            self._closed = True
            self._wake_writer()
        if self._db is not None:
            self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"the SQLite connection to {self._name} is closed")

    # -- committing -----------------------------------------------------------

    def _write_loop(self) -> None:
        with self._cond:
            while True:
                if self._pending and not self._leading:
                    self._lead()
                elif self._closed and not self._pending:
                    return
                else:
                    self._writer_idle = True
                    self._work.wait()
                    self._writer_idle = False

    def _lead(self) -> None:
        """Commit everything waiting (hold ``_cond``; released meanwhile)."""
        batch, self._pending = self._pending, []
        self._leading = True
        self._cond.release()
        try:
            self._commit(batch)
        finally:
            self._cond.acquire()
            self._leading = False
            self._cond.notify_all()
            if self._pending:  # (jobs of coroutines, that came meanwhile)
                self._wake_writer()

    def _commit(self, batch: list[Job]) -> None:
        try:
            writes = [j for j in batch if j.alone is None]
            if writes:
                self._transaction(writes)
            for job in batch:
                if job.alone is not None:
                    try:
                        job.result = job.alone()
                    except Exception as e:
                        job.error = e
        except BaseException as e:  # (KeyboardInterrupt ...): nobody waits for ever
            for job in batch:
                if job.error is None:
                    job.error = e
            raise
        finally:
            self._finish(batch)

    def _transaction(self, jobs: list[Job]) -> None:
        mode = self._sync if any(j.durable for j in jobs) else "normal"
        try:
            if self._db is None:
                self._db = self._open_db()
            db = self._db
            with db.lock:
                conn = db.conn
                if self._mode != mode:
                    conn.execute(f"PRAGMA synchronous={mode.upper()}")
                    self._mode = mode
                conn.execute("BEGIN IMMEDIATE")
                try:
                    try:
                        self._apply(conn, jobs)
                    except Exception:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        conn.execute("BEGIN IMMEDIATE")
                        self._apply_each(conn, jobs)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            self.transactions += 1
        except Exception as e:
            for job in jobs:
                job.result, job.error = None, e

    @staticmethod
    def _apply(conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Every job, the sends' rows first, in one statement."""
        rows = [row for job in jobs for row in job.rows]
        if rows:
            conn.executemany(INSERT, rows)
        for job in jobs:
            if job.write is not None:
                job.result = job.write(conn)

    @staticmethod
    def _apply_each(conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Every job in a savepoint of its own: a job that fails is rolled
        back alone and gets its error."""
        for job in jobs:
            conn.execute("SAVEPOINT kew_job")
            try:
                if job.rows:
                    conn.executemany(INSERT, job.rows)
                if job.write is not None:
                    job.result = job.write(conn)
            except Exception as e:
                if not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back: every job's error
                conn.execute("ROLLBACK TO kew_job")
                job.result, job.error = None, e
            conn.execute("RELEASE kew_job")

    def _finish(self, batch: list[Job]) -> None:
        """Tell each job's caller: sync ones by ``finished`` (``_lead``
        wakes them), coroutines on their loops."""
        loops: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        notify = False
        for job in batch:
            if job.after is not None:
                try:
                    job.after(job)
                except Exception:
                    log.exception("kew: after a SQLite write of %s", self._name)
            job.finished = True
            notify = notify or (job.notify and job.error is None)
            if job.future is not None:
                loops.setdefault(job.future.get_loop(), []).append(job)
        if loops:
            with self._cond:
                links = [(self._link(loop), jobs) for loop, jobs in loops.items()]
            for link, jobs in links:
                link.resolve(jobs)
        if notify:
            self._signal.notify()

    def _link(self, loop: asyncio.AbstractEventLoop) -> _Loop:
        """(Hold the lock.)"""
        link = self._loops.get(loop)
        if link is None:
            self._loops = {k: v for k, v in self._loops.items() if not k.is_closed()}
            link = self._loops[loop] = _Loop(loop)
        return link

    def _after_fork(self) -> None:
        """In a child made by ``os.fork``: the parent's jobs and writer
        thread are not the child's (its Db reopens by itself)."""
        self._new_conditions()
        self._pending = []
        self._leading = False
        self._writer = None
        self._writer_idle = False
        self._loops = {}
        self._mode = None


_groups: weakref.WeakSet[GroupCommit] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for group in list(_groups):
        group._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
