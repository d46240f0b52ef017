"""The SQLite provider's native async route: ``SqliteConnector.aio()``,
which :func:`kew.aio.connect` takes.

**One writer thread per connector** (:class:`~kew.embedded._sqlite_group.GroupCommit`)
runs every write the coroutines ask for: sends, claims, acks, dead letters,
hand-backs, lease renewals, declares.  It commits whatever is waiting in
one transaction (group commit: 1,000 concurrent ``await q.send(...)`` make a
handful of transactions, not 1,000) and resolves each coroutine's future on
its loop once that transaction has committed (a send is durable when its
await returns).  Browsing runs on the same thread, between transactions.  So
no coroutine ever waits on the file's lock, which another process may hold
for a while: the event loop stays free.

**Fetching.**  A fetch asks the writer to claim rows; if there are none it
waits on an ``asyncio.Event`` (:class:`~kew.embedded._sqlite_db.Waker`) that
the file's in-process wake-ups set (a send or hand-back by any connector of
this process, sync or async), for at most ``poll`` seconds (other processes'
writes), or until the next delayed row is due.  A settle that makes room
wakes it too.  A cancelled fetch keeps nothing: a claim the writer has not
run yet is skipped, and rows claimed already are handed back at once.

Leases are kept as by the sync consumer (renewed every lease/3 by a thread
of the consumer, through the writer); what a killed process held comes back
when its lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, TypeVar, cast

from kew.embedded import _sqlite_ops as ops
from kew.embedded._sqlite_db import CHECK_EVERY, Waker, lost
from kew.embedded._sqlite_group import Closed, GroupCommit, Job
from kew.embedded._sqlite_rows import rows
from kew.qchan.spi import Capability, ConsumerFailed, DeadLetter, Delivery, Message, QueueStats
from kew.qchan.spi.kit import HeldLeases

if TYPE_CHECKING:
    from kew.embedded.sqlite import SqliteBrowser, SqliteConnector

__all__ = [
    "SqliteAsyncBrowser",
    "SqliteAsyncConnector",
    "SqliteAsyncConsumer",
    "SqliteAsyncProducer",
]

log = logging.getLogger("kew.sqlite")

R = TypeVar("R")


class SqliteAsyncConnector:
    """``SqliteConnector.aio()``: the same file, awaited; takes the sync
    connector over (``close()`` closes it)."""

    def __init__(self, sync: SqliteConnector) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks: Mapping[Capability, str] = sync.lacks
        #: The writer: every write of this connector's objects goes through it.
        self.group = GroupCommit(
            sync.options.db, sync.options.sync, sync._signal, os.path.basename(sync.options.path)
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteAsyncConnector({self.url!r})"

    async def declare(self, queue: str) -> None:
        await self.group.call(Job(write=lambda c: ops.declare(c, queue)))

    async def producer(self, queue: str) -> SqliteAsyncProducer:
        return SqliteAsyncProducer(self, queue)

    async def consumer(self, queue: str, prefetch: int) -> SqliteAsyncConsumer:
        return SqliteAsyncConsumer(self, queue, prefetch)

    async def browser(self, queue: str) -> SqliteAsyncBrowser:
        return SqliteAsyncBrowser(self.group, self.sync.browser(queue))

    async def delete(self, queue: str) -> None:
        await self.group.call(Job(write=lambda c: ops.delete(c, queue)))

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: one transaction, committed by the writer of
        the sync connector's :meth:`~kew.embedded.sqlite.SqliteConnector.send_to`
        (closed with it: kew.task's ``submit_async`` uses this route without
        closing it), with whatever else waits; no coroutine waits on the file."""
        limit = self.max_message_size
        inserts = [r for queue, m in sends for r in rows(queue, limit, (m,))]
        if inserts:
            await self.sync.send_group().call(Job(rows=inserts))

    async def close(self) -> None:
        """After the writes already asked for: the writer ends, and the
        sync connector is closed."""
        if self._closed:
            return
        self._closed = True
        await self.group.call(Job(alone=self._close_all), last=True)

    def _close_all(self) -> None:  # on the writer thread
        self.group.close()
        self.sync.close()


class SqliteAsyncProducer:
    def __init__(self, connector: SqliteAsyncConnector, queue: str) -> None:
        self._group = connector.group
        self._limit = connector.max_message_size
        self._queue = queue

    async def send(self, message: Message) -> None:
        await self._group.call(Job(rows=rows(self._queue, self._limit, (message,))))

    async def send_many(self, messages: Sequence[Message]) -> None:
        if messages:
            await self._group.call(Job(rows=rows(self._queue, self._limit, messages)))

    async def close(self) -> None:
        pass


class _Handoff:
    """Who gets the rows a claim took: the fetch awaiting it, or (once that
    was cancelled) a hand-back."""

    __slots__ = ("abandoned", "lock", "taken")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.taken: list[Delivery] = []


class SqliteAsyncConsumer:
    def __init__(self, connector: SqliteAsyncConnector, queue: str, prefetch: int) -> None:
        options = connector.sync.options
        self._group = connector.group
        self._signal = connector.sync._signal
        self._file = connector.sync._db  # for Db.lost(): a stat, no lock
        self._queue = queue
        self._prefetch = prefetch
        self._poll = options.poll
        self._ops = ops.Claims(queue, os.urandom(12).hex(), options.lease_ms)
        self._closed = False
        self._failed: ConsumerFailed | None = None
        self._check_at = 0.0  # when to look at the database file next
        self._waker: Waker | None = None
        # the rows held (by seq), their leases renewed every lease/3
        self._held: HeldLeases[int] = HeldLeases(
            self._renew, options.lease_ms / 3000, name="kew-sqlite-lease"
        )

    async def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` (a pull consumer: only the
        bound its fetches keep to moves; no I/O)."""
        self._prefetch = count

    # -- fetching -----------------------------------------------------------

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        if self._failed is not None:
            raise self._failed
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = Waker()
        waker = self._waker
        deadline = loop.time() + timeout
        self._signal.watch(waker)
        try:
            while not self._closed:
                self._look()
                room = self._held.room(self._prefetch, max_count)
                waker.event.clear()  # a wake-up from now on ends the wait below
                due = None
                if room > 0:
                    got, due = await self._claim(room)
                    if got:
                        return got
                left = deadline - loop.time()
                if left <= 0:
                    return []
                wait = min(left, self._poll)
                if due is not None and due < wait:
                    wait = max(due, 0.001)
                with suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await waker.event.wait()
            return []
        except sqlite3.Error as e:
            if lost(e):
                raise self._fail(f"{self._file.path}: {e}") from e
            raise
        finally:
            self._signal.unwatch(waker)

    def _look(self) -> None:
        """At most once a second, a stat: is the file still the database?"""
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + CHECK_EVERY
            problem = self._file.lost()
            if problem is not None:
                raise self._fail(problem)

    def _fail(self, problem: str) -> ConsumerFailed:
        """Fail for good: this fetch and every later one raise."""
        self._failed = ConsumerFailed(problem)
        return self._failed

    async def _claim(self, room: int) -> tuple[list[Delivery], float | None]:
        """Up to ``room`` deliveries claimed by the writer (held from then
        on), and if none, the seconds until the next delayed row is due."""
        box = _Handoff()

        def write(c: sqlite3.Connection) -> tuple[list[Delivery], float | None]:
            if box.abandoned:  # cancelled before its turn: claim nothing
                return [], None
            got = self._ops.claim(c, room)
            return got, None if got else self._ops.next_due(c)

        def after(job: Job) -> None:  # on the writer thread, once committed
            got: list[Delivery] = [] if job.error is not None else job.result[0]
            if not got:
                return
            with box.lock:
                if not box.abandoned:
                    for d in got:
                        self._held.add(cast(int, d.tag), d)
                    box.taken = got
                    return
            self._hand_back_soon([cast(int, d.tag) for d in got])

        try:
            return cast(
                "tuple[list[Delivery], float | None]",
                await self._group.call(Job(write=write, after=after)),
            )
        except asyncio.CancelledError:
            with box.lock:
                box.abandoned = True
                late = box.taken
            if late:  # claimed, but the fetch was cancelled before it resumed
                self._hand_back_soon(self._held.take([cast(int, d.tag) for d in late]))
            raise

    def _hand_back_soon(self, seqs: list[int]) -> None:
        """Hand rows back in the writer's next transaction (nobody waits)."""
        if not seqs:
            return

        def failed(job: Job) -> None:
            if job.error is not None:
                log.warning(
                    "kew: handing back %d deliveries of %s failed (they come back when "
                    "their leases end): %s",
                    len(seqs),
                    self._queue,
                    job.error,
                )

        try:
            self._group.submit(
                Job(write=lambda c: self._ops.hand_back(c, seqs), notify=True, after=failed)
            )
        except Closed as e:
            log.warning("kew: cannot hand back %d deliveries of %s: %s", len(seqs), self._queue, e)

    # -- settling -----------------------------------------------------------

    def _take(self, delivery: Delivery) -> int | None:
        """The row of a delivery this consumer still holds (no longer held
        from now on: a fetch waiting for room goes on); None if settled
        already, or handed back."""
        seq = cast(int, delivery.tag)
        if not self._held.take([seq]):
            return None
        if self._waker is not None:
            self._waker.wake()
        return seq

    async def ack(self, delivery: Delivery) -> None:
        if (seq := self._take(delivery)) is not None:
            await self._group.call(Job(write=lambda c: self._ops.ack(c, (seq,))))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack ``deliveries`` in one job of the writer (kew.aio's grouped
        acks); if it fails, none is acked."""
        seqs = [seq for d in deliveries if (seq := self._take(d)) is not None]
        if seqs:
            await self._group.call(Job(write=lambda c: self._ops.ack(c, seqs)))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if (seq := self._take(delivery)) is not None:
            await self._group.call(Job(write=lambda c: self._ops.dead_letter(c, seq, reason)))

    async def release(self, delivery: Delivery) -> None:
        if (seq := self._take(delivery)) is not None:
            await self._group.call(Job(write=lambda c: self._ops.hand_back(c, (seq,)), notify=True))

    def _renew(self, seqs: Sequence[int]) -> None:
        """Extend the leases of the held rows (HeldLeases' thread, every
        lease/3; waits for the writer, or commits the group itself)."""
        if self._closed:
            return
        try:
            self._group.run(Job(write=lambda c: self._ops.renew(c, seqs)))
        except Exception as e:  # a busy moment: two more tries before the lease ends
            log.warning("kew: renewing the leases on %s failed: %s", self._queue, e)

    async def close(self) -> None:
        """Hand back every delivery held (a renewal under way changes
        nothing: it only extends rows still owned)."""
        if self._closed:
            return
        self._closed = True
        held = self._held.close()
        if self._waker is not None:
            self._waker.wake()
        if held and self._failed is None:  # else the file is gone: nothing to hand back to
            try:
                await self._group.call(
                    Job(write=lambda c: self._ops.hand_back(c, held), notify=True)
                )
            except Closed as e:
                log.warning(
                    "kew: cannot hand back %d deliveries of %s (they come back when their "
                    "leases end): %s",
                    len(held),
                    self._queue,
                    e,
                )


class SqliteAsyncBrowser:
    """The sync browser's reads and writes, each on the writer thread."""

    def __init__(self, group: GroupCommit, sync: SqliteBrowser) -> None:
        self._group = group
        self._sync = sync

    async def _alone(self, fn: Callable[[], R]) -> R:
        return cast(R, await self._group.call(Job(alone=fn)))

    async def peek(self, limit: int) -> Sequence[Message]:
        return await self._alone(lambda: self._sync.peek(limit))

    async def stats(self) -> QueueStats:
        return await self._alone(self._sync.stats)

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return await self._alone(lambda: self._sync.dead_letters(limit))

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._alone(lambda: self._sync.requeue_dead(ids))

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return await self._alone(lambda: self._sync.purge_dead(ids))

    async def purge(self) -> int:
        return await self._alone(self._sync.purge)

    async def close(self) -> None:
        pass
