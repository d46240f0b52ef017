"""Group commits: settles of many deliveries in one broker call.

Handlers that finish while a commit is under way join the next one, so N
deliveries settled together cost one round trip, not N (one ``XACK`` for
many ids on Redis, one transaction on SQLite, one confirm wait on
RabbitMQ).  :class:`GroupCommit` commits on the first caller's thread,
:class:`AsyncGroupCommit` finishes by callback (no thread waits on the
broker), :class:`LoopGroupCommit` is for coroutines (a task of their event
loop commits, awaiting).  :class:`GroupSettle` is
the task layer's settle (messages stored, then the acks); :class:`GroupAck`
is a plain sink's with handler threads, committed on a thread of its own
(a sink whose handler runs on its fetch thread commits each fetched
batch's acks there: kew.qchan._inline).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from kew.qchan.spi import (
    AsyncOutboxConsumer,
    Consumer,
    Delivery,
    Message,
    OutboxConsumer,
)

log = logging.getLogger("kew.consumer")

P = TypeVar("P")

SendMany = Callable[[str, Sequence[Message]], None]
"""Sends messages to a queue (by name); returns once the broker has them."""

Done = Callable[[BaseException | None], None]
"""Called once a commit is done: None, or what it failed with."""


class _Commits(Generic[P]):
    """What both group commits share: ``submit`` waits on ``submit_later``."""

    def submit_later(self, payload: P, done: Done) -> None:
        raise NotImplementedError

    def submit(self, payload: P) -> None:
        """Return once ``payload`` is committed; raise if its batch failed."""
        outcome: list[BaseException | None] = []
        finished = threading.Event()

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        self.submit_later(payload, done)
        finished.wait()
        if outcome[0] is not None:
            raise outcome[0]


class GroupCommit(_Commits[P]):
    """Batches concurrent callers into one commit (a group commit): whoever
    comes while a commit is under way joins the next one, so N callers
    arriving together cost one commit, not N.  The caller that finds no
    commit under way commits, and goes on committing what others add
    meanwhile until nothing is left.  ``commit`` gets the payloads of every
    caller of a batch, in arrival order; if it raises, every caller of that
    batch learns the error.  One commit is under way at a time (why, with
    figures: docs/tasks.md, "Throughput").
    """

    def __init__(self, commit: Callable[[list[P]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._committing = False
        self._later: list[tuple[P, Done]] = []

    def submit_later(self, payload: P, done: Done) -> None:
        """Like :meth:`submit`, but returns at once while another caller is
        committing (that one commits this too).  ``done(error)`` is called
        after the commit (``None``: committed), in the committing thread."""
        with self._lock:
            self._later.append((payload, done))
            if self._committing:
                return
            self._committing = True
        while True:
            with self._lock:
                items, self._later = self._later, []
                if not items:
                    self._committing = False
                    return
            failure: BaseException | None = None
            try:
                self._commit([payload for payload, _ in items])
            except BaseException as e:
                failure = e
            for _, callback in items:
                try:
                    callback(failure)
                except Exception:
                    log.exception("kew: a group commit callback failed")


class AsyncGroupCommit(_Commits[P]):
    """A :class:`GroupCommit` whose commit finishes by callback
    (``commit(payloads, done)`` returns at once): no thread waits on the
    broker.  One commit is under way at a time; callers arriving meanwhile
    join the next batch, which whoever finishes the commit starts (often the
    broker's I/O thread)."""

    def __init__(self, commit: Callable[[list[P], Done], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._committing = False
        self._later: list[tuple[P, Done]] = []

    def submit_later(self, payload: P, done: Done) -> None:
        """Queue ``payload``; ``done(error)`` is called after its commit, on
        whichever thread finishes it."""
        with self._lock:
            self._later.append((payload, done))
            if self._committing:
                return
            self._committing = True
            items, self._later = self._later, []
        self._start(items)

    def _start(self, items: list[tuple[P, Done]]) -> None:
        # A commit that finishes before it returns (nothing to wait for)
        # hands its successor back to this loop, not to a nested call.
        me = threading.get_ident()
        while items:
            successor: list[list[tuple[P, Done]]] = []
            inside = [True]

            def finished(
                error: BaseException | None,
                batch: list[tuple[P, Done]] = items,
                successor: list[list[tuple[P, Done]]] = successor,
                inside: list[bool] = inside,
            ) -> None:
                for _, callback in batch:
                    try:
                        callback(error)
                    except Exception:
                        log.exception("kew: a group commit callback failed")
                with self._lock:
                    if not self._later:
                        self._committing = False
                        return
                    after, self._later = self._later, []
                if inside[0] and threading.get_ident() == me:
                    successor.append(after)
                else:
                    self._start(after)

            try:
                self._commit([payload for payload, _ in items], finished)
            except BaseException as e:
                finished(e)
            inside[0] = False
            items = successor[0] if successor else []


class _LoopBatch(Generic[P]):
    """One event loop's payloads waiting, and the task committing them."""

    __slots__ = ("task", "waiting")

    def __init__(self) -> None:
        self.waiting: list[tuple[P, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None


class LoopGroupCommit(Generic[P]):
    """The group commit of coroutines: the payloads submitted in one turn of
    an event loop go out in one ``await commit(payloads)``, run by a task of
    that loop, and those submitted while it runs in the next one (one
    commit under way per loop; each loop has its own batches).  If a commit
    fails, every caller of its batch gets the error.  A caller that gives up
    (cancelled) leaves its payload in its batch: it may be committed."""

    def __init__(self, commit: Callable[[list[P]], Awaitable[None]]) -> None:
        self._commit = commit
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatch[P]] = (
            weakref.WeakKeyDictionary()
        )
        #: Commits made (a statistic, for tests).
        self.commits = 0

    async def submit(self, payload: P) -> None:
        """Return once ``payload`` is committed; raise its batch's error."""
        loop = asyncio.get_running_loop()
        batch = self._loops.get(loop)
        if batch is None:
            batch = self._loops[loop] = _LoopBatch()
        future: asyncio.Future[None] = loop.create_future()
        batch.waiting.append((payload, future))
        if batch.task is None:  # starts at the loop's next turn: this turn's payloads join
            batch.task = loop.create_task(self._drain(batch))
        await future

    async def _drain(self, batch: _LoopBatch[P]) -> None:
        """Commit what waits, batch after batch, until nothing is left."""
        try:
            while batch.waiting:
                items, batch.waiting = batch.waiting, []
                error: BaseException | None = None
                self.commits += 1
                try:
                    await self._commit([payload for payload, _ in items])
                except BaseException as e:  # every caller of the batch hears it
                    error = e
                for _, future in items:
                    if future.done():  # its caller gave up
                        continue
                    if error is None:
                        future.set_result(None)
                    elif isinstance(error, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(error)
                if error is not None and not isinstance(error, Exception):
                    raise error  # cancelled (the loop is closing), KeyboardInterrupt
        finally:
            batch.task = None


Settlement = tuple[Sequence[Delivery], Sequence[tuple[str, Message]]]
"""Deliveries to ack, and (queue, message) pairs to store first."""


class GroupSettle:
    """Settles one consumer's deliveries together with outgoing messages
    (an outbox), batching concurrent callers with a :class:`GroupCommit`.

    A consumer with ``settle`` (:class:`OutboxConsumer`) commits a batch in
    one step; for any other, the batch's messages go out first with
    ``send_many`` (one call per queue), then each delivery is acked.  Either
    way a delivery is never acked before the messages are stored.

    ``pack(queue, messages)``, if given, may rewrite the messages of one
    batch bound for one queue before they are sent (the task layer packs
    the status events of a batch's handlers into one message).
    """

    def __init__(
        self,
        consumer: Consumer,
        send_many: SendMany,
        *,
        pack: Callable[[str, list[Message]], list[Message]] | None = None,
    ) -> None:
        self._consumer = consumer
        self._send_many = send_many
        self._pack = pack
        self._outbox = consumer if isinstance(consumer, OutboxConsumer) else None
        self._group: GroupCommit[Settlement] | AsyncGroupCommit[Settlement]
        if isinstance(consumer, AsyncOutboxConsumer):
            self._async = consumer
            self._group = AsyncGroupCommit(self._commit_async)
        else:
            self._group = GroupCommit(self._commit)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Return once ``sends`` are stored and ``acks`` acked; raise if
        their batch failed."""
        self._group.submit((acks, sends))

    def settle_later(
        self,
        acks: Sequence[Delivery],
        sends: Sequence[tuple[str, Message]],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Like :meth:`settle`, but returns at once while another caller is
        committing; ``done(error)`` is called after the commit.  A handler
        that returns before ``done`` keeps its delivery counted as held
        (``Subscription.hold``)."""
        self._group.submit_later((acks, sends), done)

    def _gather(self, batch: list[Settlement]) -> tuple[list[Delivery], dict[str, list[Message]]]:
        acks = [d for a, _ in batch for d in a]
        by_queue: dict[str, list[Message]] = {}
        for _, sends in batch:
            for queue, message in sends:
                by_queue.setdefault(queue, []).append(message)
        if self._pack is not None:
            by_queue = {q: self._pack(q, ms) for q, ms in by_queue.items()}
        return acks, by_queue

    def _commit_async(self, batch: list[Settlement], done: Done) -> None:
        acks, by_queue = self._gather(batch)
        self._async.settle_async(acks, [(q, m) for q, ms in by_queue.items() for m in ms], done)

    def _commit(self, batch: list[Settlement]) -> None:
        acks, by_queue = self._gather(batch)
        if self._outbox is not None:
            self._outbox.settle(acks, [(q, m) for q, ms in by_queue.items() for m in ms])
            return
        for queue, messages in by_queue.items():
            self._send_many(queue, messages)
        for delivery in acks:
            self._consumer.ack(delivery)


class GroupAck:
    """Acks one consumer's deliveries in groups, on a thread of its own
    (started on first use): a plain sink's handler thread hands its ack
    over and takes the next delivery at once, and the acks handed over
    while a commit is under way go in the next one.  A commit is the
    consumer's ``settle`` with no sends (:class:`OutboxConsumer`: one
    ``XACK`` for many ids on Redis, one transaction on SQLite, RabbitMQ's
    acks written by its I/O thread), else one ``ack`` each.

    ``committed(deliveries, since, error)`` is called once per commit, on
    that thread: the deliveries, when they were handed over on average
    (``time.monotonic()``), and None or what the commit failed with.  The
    hand-over takes no lock (a deque append) unless the thread is idle:
    a lock per ack, contended by the commit thread, cost more than the ack.
    """

    def __init__(
        self,
        consumer: Consumer,
        committed: Callable[[list[Delivery], float, BaseException | None], None],
        *,
        name: str,
    ) -> None:
        self._consumer = consumer
        self._outbox = consumer if isinstance(consumer, OutboxConsumer) else None
        self._committed = committed
        self._name = name
        self._queue: deque[tuple[Delivery, float]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits for work: a hand-over must wake it
        self._closing = False
        #: Commits made, and deliveries acked by them (statistics).
        self.commits = self.acked = 0

    def ack_later(self, delivery: Delivery) -> bool:
        """Hand ``delivery`` over for the next commit; False once closed
        (then the caller acks it)."""
        if self._closing:
            return False
        self._queue.append((delivery, time.monotonic()))
        self.kick()
        return True

    def kick(self) -> None:
        """Wake the commit thread if acks wait and it is idle (start it
        the first time)."""
        if self._queue and (self._thread is None or self._idle):
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                elif self._idle:
                    # Only the first hand-over wakes it: until it runs, the
                    # next ones would each take the lock again.
                    self._idle = False
                    self._cond.notify()

    def _take(self) -> list[tuple[Delivery, float]]:
        items = []
        queue = self._queue
        while queue:
            items.append(queue.popleft())
        return items

    def _loop(self) -> None:
        while True:
            items = self._take()
            if not items:
                with self._cond:
                    if not self._queue:  # (else: handed over before _idle was set)
                        if self._closing:
                            return
                        self._idle = True
                        self._cond.wait()
                    self._idle = False
                continue
            deliveries = [d for d, _ in items]
            failure: BaseException | None = None
            try:
                if self._outbox is not None:
                    self._outbox.settle(deliveries, ())
                else:
                    for delivery in deliveries:
                        self._consumer.ack(delivery)
            except BaseException as e:
                failure = e
            self.commits += 1
            self.acked += len(deliveries)
            try:
                self._committed(deliveries, sum(t for _, t in items) / len(items), failure)
            except Exception:
                log.exception("kew: a group commit callback failed")

    def close(self, timeout: float = 10.0) -> bool:
        """Commit what was handed over, then end the thread (waiting up to
        ``timeout`` seconds); later hand-overs are refused.  Returns True
        if it ended in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()
