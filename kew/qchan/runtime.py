"""The consumer runtime: fetches deliveries and runs a handler on them.

Liveness tells the truth (``alive``, ``healthy()``): a subscription whose
fetch loop died, whose consumer failed for good (:class:`ConsumerFailed`),
whose fetches have failed for longer than ``stall_after``, or that left
work waiting on the broker for longer than ``stall_after`` while it had
room, is not alive.

One fetch thread keeps at most ``prefetch`` deliveries unsettled and hands
them to ``concurrency`` handler threads (or runs them inline when
``concurrency`` is 1).  The handler settles each delivery; whatever it
raises is logged and the delivery is handed back, so nothing is lost and the
loop never dies.  ``stop()`` stops fetching, hands back what has not
started, and gives running handlers a grace period before handing theirs
back too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kew.qchan.spi import (
    AsyncOutboxConsumer,
    Consumer,
    ConsumerFailed,
    Delivery,
    Message,
    OutboxConsumer,
)

log = logging.getLogger("kew.consumer")

P = TypeVar("P")

Handler = Callable[[Consumer, Delivery], None]
"""Processes one delivery and settles it through the consumer."""

SendMany = Callable[[str, Sequence[Message]], None]
"""Sends messages to a queue (by name); returns once the broker has them."""


#: Seconds of failing fetches, or of work waiting undelivered while there
#: was room, after which a subscription is no longer alive / healthy.
STALL_AFTER = 60.0

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


class Subscription:
    """A running consumer. Use as a context manager, or call ``stop()``."""

    def __init__(
        self,
        consumer: Consumer,
        handler: Handler,
        *,
        name: str,
        concurrency: int = 1,
        prefetch: int | None = None,
        poll_interval: float = 0.5,
        waiting: Callable[[], int] | None = None,
        stall_after: float = STALL_AFTER,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        prefetch = prefetch or concurrency
        if prefetch < concurrency:
            raise ValueError(f"prefetch ({prefetch}) must be >= concurrency ({concurrency})")
        self._handler = handler
        loops = [(self._fetch_loop, f"kew-fetch-{name}")]
        if concurrency > 1:
            loops += [(self._work_loop, f"kew-work-{name}-{i}") for i in range(concurrency)]
        self._start(consumer, name, concurrency, prefetch, poll_interval, loops)
        self._waiting = waiting
        self._stall_after = stall_after

    def _start(
        self,
        consumer: Consumer,
        name: str,
        concurrency: int,
        prefetch: int,
        poll_interval: float,
        loops: Sequence[tuple[Callable[[], None], str]],
    ) -> None:
        """Set up the state every subscription shares, then start ``loops``
        (target, thread name), one thread each; the first one fetches (it is
        the one ``alive`` watches)."""
        self.name = name
        self.concurrency = concurrency
        self.prefetch = prefetch
        self._refill = max(1, prefetch // 4)
        self._consumer = consumer
        self._poll = poll_interval
        # Two conditions on one lock, so that a wake-up goes only to whom it
        # concerns: ``_cond`` to the fetch loop and stop() (room freed, state
        # changed), ``_work`` to idle handler threads (deliveries to run).
        # One condition for both woke every handler thread at each settle.
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._pending: deque[Delivery] = deque()  # fetched, not started
        self._running = 0  # started, not finished
        self._settling = 0  # finished, settle still under way (see hold())
        self._stopping = False
        self._closed = threading.Event()
        self.last_fetch = time.monotonic()
        self.last_delivery = self.last_fetch
        self.handled = 0
        #: Why the consumer failed for good (``ConsumerFailed``), else None.
        self.error: BaseException | None = None
        self._failing_since: float | None = None  # first of consecutive failed fetches
        self._waiting_since: float | None = None  # work seen waiting, nothing delivered since
        self._waiting = None
        self._stall_after = STALL_AFTER
        self._threads = [
            threading.Thread(target=target, name=thread, daemon=True) for target, thread in loops
        ]
        for t in self._threads:
            t.start()

    # -- state ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Deliveries held: fetched and not yet settled."""
        with self._cond:
            return len(self._pending) + self._running + self._settling

    def _room(self) -> int:
        """How many deliveries to fetch now (caller holds the lock): the room
        under ``prefetch`` once it is worth a fetch, else 0.  With handlers
        busy or work pending for each idle one, it waits until a quarter of
        the prefetch is free, so that a fetch (a round trip on most brokers)
        brings a batch rather than one delivery (figures: docs/tasks.md)."""
        room = self.prefetch - len(self._pending) - self._running - self._settling
        if room <= 0:
            return 0
        if room >= self._refill or len(self._pending) + self._running < self.concurrency:
            return room
        return 0

    @property
    def stall_after(self) -> float:
        """Seconds of failing fetches, or of work left waiting undelivered
        while there was room, after which this subscription is no longer
        alive / healthy (``STALL_AFTER`` unless given)."""
        return self._stall_after

    @stall_after.setter
    def stall_after(self, seconds: float) -> None:
        self._stall_after = seconds

    @property
    def alive(self) -> bool:
        """The fetch loop is running, has polled recently, its consumer has
        not failed for good, and its fetches have not been failing for
        longer than ``stall_after``.  Asks the broker nothing."""
        now = time.monotonic()
        failing = self._failing_since
        return (
            not self._stopping
            and self.error is None
            and self._threads[0].is_alive()
            and now - self.last_fetch < 10 * self._poll + 30
            and (failing is None or now - failing < self._stall_after)
        )

    def healthy(self) -> bool:
        """``alive``, and not stalled: work has not been waiting on the broker
        for longer than ``stall_after`` while this subscription had room and
        delivered nothing.  Asks the broker for the ready count (when the
        subscription was given ``waiting``) at most once a call; call it
        from a health probe, every few seconds."""
        return self.alive and not self._stalled()

    def _stalled(self) -> bool:
        if self._waiting is None:
            return False
        now = time.monotonic()
        with self._cond:
            full = len(self._pending) + self._running + self._settling >= self.prefetch
            if full or self.last_delivery > (self._waiting_since or -1.0):
                # Busy (long handlers are progress) or delivered since: reset.
                self._waiting_since = None
            since = self._waiting_since
        if full:
            return False
        try:
            waiting = self._waiting()
        except Exception as e:  # the broker cannot tell: fetch failures say the rest
            log.debug("kew: cannot count what waits on %s: %s", self.name, e)
            return False
        if waiting <= 0:
            with self._cond:
                self._waiting_since = None
            return False
        if since is None:
            with self._cond:
                self._waiting_since = now
            return False
        if now - since < self._stall_after:
            return False
        log.error(
            "kew: %s has had %d message(s) waiting for %.0f s and delivered none: stalled",
            self.name,
            waiting,
            now - since,
        )
        return True

    # -- loops ------------------------------------------------------------

    def _fetch_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not (room := self._room()):
                        self._cond.wait(self._poll)
                        self.last_fetch = time.monotonic()
                    if self._stopping or self.error is not None:
                        return
                batch = self._fetch(room)
                if not batch:
                    continue
                if self.concurrency == 1:
                    for i, delivery in enumerate(batch):
                        if self._stopping:
                            for rest in batch[i:]:
                                self._settle_safely(self._consumer.release, rest)
                            break
                        with self._cond:
                            self._running += 1
                        self._run(delivery)
                else:
                    with self._cond:
                        if not self._stopping:
                            self._pending.extend(batch)
                            self._work.notify(len(batch))
                            batch = []
                    for late in batch:  # stop() came while fetching: hand these back
                        self._settle_safely(self._consumer.release, late)
        finally:
            self._closed.set()

    def _fetch(self, most: int) -> Sequence[Delivery]:
        """Up to ``most`` deliveries; none if the fetch failed (logged, and
        after a pause unless stopping)."""
        try:
            batch = self._consumer.fetch(most, self._poll)
        except ConsumerFailed as e:
            log.error("kew: the consumer of %s failed and cannot recover: %s", self.name, e)
            with self._cond:
                self.error = e
                self._cond.notify_all()
            return ()
        except Exception as e:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                log.exception("kew: fetching from %s failed; retrying", self.name)
            else:
                log.warning(
                    "kew: fetching from %s still fails after %.0f s; retrying: %s",
                    self.name,
                    now - self._failing_since,
                    e,
                )
            self._wait_stopping(1.0)
            return ()
        now = time.monotonic()
        self._failing_since = None
        self.last_fetch = now
        if batch:
            self.last_delivery = now
        return batch

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._work.wait()
                if not self._pending:
                    return
                delivery = self._pending.popleft()
                self._running += 1
            self._run(delivery)

    def _run(self, delivery: Delivery) -> None:
        try:
            self._handler(self._consumer, delivery)
        except Exception:
            log.exception("kew: handler for %s failed outside the sink; handing back", self.name)
            self._settle_safely(self._consumer.release, delivery)
        finally:
            with self._cond:
                self._running -= 1
                self.handled += 1
                self._wake()

    def hold(self) -> Callable[[], None]:
        """For a handler that returns before its delivery is settled (a
        settle left to a group commit): the delivery stays counted as held
        (against ``prefetch``, and waited for by ``stop()``) until the
        returned function is called, once, when it is settled or failed."""
        with self._cond:
            self._settling += 1
        called = False

        def done() -> None:
            nonlocal called
            with self._cond:
                if not called:
                    called = True
                    self._settling -= 1
                    self._wake()

        return done

    def _wake(self) -> None:
        """After a delivery is finished or settled (caller holds the lock):
        wake the fetch loop if it has something to fetch, and stop()."""
        if self._stopping or self._room():
            self._cond.notify_all()

    def _settle_safely(self, settle: Callable[[Delivery], None], delivery: Delivery) -> None:
        try:
            settle(delivery)
        except Exception:
            log.exception(
                "kew: settling a delivery on %s failed; it will be redelivered", self.name
            )

    def _wait_stopping(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)

    # -- stopping ---------------------------------------------------------

    def stop(self, grace: float = 30.0) -> bool:
        """Stop; wait up to ``grace`` seconds for running handlers.

        Deliveries not yet started are handed back at once; those still
        running after the grace period are handed back when the consumer
        closes.  Returns True if every handler finished in time.
        """
        with self._cond:
            if (
                self._stopping
                and self._closed.is_set()
                and not self._running
                and not self._settling
            ):
                return True
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            self._work.notify_all()
        for delivery in pending:
            self._settle_safely(self._consumer.release, delivery)
        deadline = time.monotonic() + grace
        self._closed.wait(max(0.0, deadline - time.monotonic()))
        with self._cond:
            while (self._running or self._settling) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            finished = self._running == 0 and self._settling == 0
        try:
            self._consumer.close()
        except Exception:
            log.exception("kew: closing the consumer of %s failed", self.name)
        return finished

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BatchSubscription(Subscription):
    """A :class:`Subscription` whose handler gets each fetched batch at once
    (the recorder applies a batch of events in one store transaction)."""

    def __init__(
        self,
        consumer: Consumer,
        handler: Callable[[Consumer, Sequence[Delivery]], None],
        *,
        name: str,
        prefetch: int = 512,
        poll_interval: float = 0.5,
        waiting: Callable[[], int] | None = None,
        stall_after: float = STALL_AFTER,
    ) -> None:
        # Not Subscription.__init__ (it starts per-delivery threads): its state, one batch loop.
        self._batch_handler = handler
        loops = [(self._batch_loop, f"kew-batch-{name}")]
        self._start(consumer, name, 1, prefetch, poll_interval, loops)
        self._waiting = waiting
        self._stall_after = stall_after

    def _batch_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping or self.error is not None:
                        return
                batch = self._fetch(self.prefetch)
                if not batch:
                    continue
                with self._cond:
                    self._running = len(batch)
                failed = False
                try:
                    self._batch_handler(self._consumer, batch)
                except Exception:
                    log.exception("kew: a batch from %s failed; handing it back", self.name)
                    for delivery in batch:
                        self._settle_safely(self._consumer.release, delivery)
                    failed = True
                finally:
                    with self._cond:
                        self._running = 0
                        self.handled += len(batch)
                        self._cond.notify_all()
                if failed:
                    self._wait_stopping(1.0)
        finally:
            self._closed.set()
