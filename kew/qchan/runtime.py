"""The consumer runtime: fetches deliveries and runs a handler on them.

Liveness tells the truth (``alive``, ``healthy()``): a subscription whose
fetch loop died, whose consumer failed for good (:class:`ConsumerFailed`),
whose fetches have failed for longer than ``stall_after``, or that left
work waiting on the broker for longer than ``stall_after`` while it had
room, is not alive.

One fetch thread keeps at most ``window`` deliveries unsettled and hands
them to ``concurrency`` handler threads (or runs them inline when
``concurrency`` is 1, or when the handlers hand their work over:
``inline``, :meth:`Subscription.hand_over`).  The window is ``prefetch``
when given, else it adapts (:mod:`kew.qchan._window`): the concurrency
for long handlers, more for short ones, so that handlers do not wait on
round trips.  The handler
settles each delivery, or returns True to have it acked: in a group with
others while the window exceeds the concurrency (on the fetch thread once
its batch is run, when the handlers run there: :mod:`kew.qchan._inline`;
else on a thread of the group's, :class:`GroupAck`), else at once.
Whatever it raises is logged and the delivery is handed back, so nothing
is lost and the loop never dies.  ``stop()`` stops fetching, hands
back what has not started, and gives running handlers a grace period
before handing theirs back too.

The group commits live in :mod:`kew.qchan._commit` (imported from here
too), the handlers run on the fetch thread in :mod:`kew.qchan._inline`,
the liveness rules in :mod:`kew.qchan._liveness` (shared with kew.aio).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kew.qchan._commit import (
    AsyncGroupCommit,
    Done,
    GroupAck,
    GroupCommit,
    GroupSettle,
    SendMany,
    Settlement,
)
from kew.qchan._inline import HANDED_OVER, Handover, run_batch
from kew.qchan._liveness import STALL_AFTER, Liveness
from kew.qchan._window import Window, WindowPolicy
from kew.qchan.spi import Consumer, ConsumerFailed, Delivery, WindowedConsumer

__all__ = [
    "HANDED_OVER",
    "STALL_AFTER",
    "AsyncGroupCommit",
    "BatchSubscription",
    "Done",
    "GroupAck",
    "GroupCommit",
    "GroupSettle",
    "Handler",
    "Handover",
    "SendMany",
    "Settlement",
    "Subscription",
]

log = logging.getLogger("kew.consumer")

Handler = Callable[[Consumer, Delivery], object]
"""Processes one delivery and settles it through the consumer, or returns
True to have the subscription ack it (in a group commit, see
:meth:`Subscription.ack`), or :data:`HANDED_OVER` once it handed the work
on (:meth:`Subscription.hand_over`)."""


class Subscription:
    """A running consumer. Use as a context manager, or call ``stop()``.

    ``prefetch`` pins the window (deliveries held at most); without it the
    window adapts (:mod:`kew.qchan._window`), from the concurrency up, when
    the consumer's window can change (:class:`~kew.qchan.spi.WindowedConsumer`;
    the consumer must then be made with the concurrency as its prefetch),
    and stays the concurrency when it cannot.

    ``inline``: the handler runs on the fetch thread whatever the
    concurrency, for a handler that hands its work over
    (:meth:`hand_over`) and returns at once.
    """

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
        inline: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if prefetch is not None and prefetch < concurrency:
            raise ValueError(f"prefetch ({prefetch}) must be >= concurrency ({concurrency})")
        self._handler = handler
        # Handlers on the fetch thread: with one handler, or ``inline`` (a
        # handler that hands its work over: ``hand_over``, no thread waits).
        self._inline = concurrency == 1 or inline
        loops = [(self._fetch_loop, f"kew-fetch-{name}")]
        if not self._inline:
            loops += [(self._work_loop, f"kew-work-{name}-{i}") for i in range(concurrency)]
        self._start(consumer, name, concurrency, prefetch, poll_interval, loops)
        self._waiting = waiting
        self._live.stall_after = stall_after

    def _start(
        self,
        consumer: Consumer,
        name: str,
        concurrency: int,
        prefetch: int | None,
        poll_interval: float,
        loops: Sequence[tuple[Callable[[], None], str]],
    ) -> None:
        """Set up the state every subscription shares, then start ``loops``
        (target, thread name), one thread each; the first one fetches (it is
        the one ``alive`` watches)."""
        self.name = name
        self.concurrency = concurrency
        self._windowed: WindowedConsumer | None = None
        if prefetch is None and isinstance(consumer, WindowedConsumer):
            self._windowed = consumer
        policy = WindowPolicy(concurrency) if self._windowed is not None else None
        self._win = Window(name, concurrency, prefetch, policy)
        self._consumer = consumer
        self._acks = GroupAck(consumer, self._committed, name=f"kew-ack-{name}")
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
        self.handled = 0
        self._live = Liveness(name, poll_interval)  # (shared with kew.aio)
        self._waiting = None
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

    @property
    def window(self) -> int:
        """Deliveries this subscription holds at most now: ``prefetch`` when
        it was given, else the adaptive window (the concurrency while
        handlers are long or the consumer's window cannot change; up to
        ``kew.qchan._window.cap`` for short handlers)."""
        return self._win.size

    @property
    def prefetch(self) -> int:
        """The same as :attr:`window` (its older name)."""
        return self._win.size

    @property
    def adaptive(self) -> bool:
        """The window adapts to the handlers (no ``prefetch`` was given, and
        the consumer's window can change)."""
        return self._win.policy is not None

    def _room(self) -> int:
        """How many deliveries to fetch now (caller holds the lock):
        :meth:`Window.room <kew.qchan._window.Window.room>`."""
        return self._win.room(len(self._pending) + self._running, self._settling)

    def _resize(self, old: int, new: int) -> None:
        """Ask the consumer for the window ``new`` (it may take a round
        trip, outside the lock), which :meth:`Window.adapt
        <kew.qchan._window.Window.adapt>` decided."""
        assert self._windowed is not None
        try:
            self._windowed.set_prefetch(new)
        except Exception as e:
            with self._cond:
                self._win.refused(old, new, e)
            return
        with self._cond:
            if self._win.granted(old, new):
                self._wake()

    @property
    def error(self) -> BaseException | None:
        """Why the consumer failed for good (``ConsumerFailed``), else None."""
        return self._live.error

    @property
    def last_fetch(self) -> float:
        """When (``time.monotonic()``) the fetch loop last fetched or looked."""
        return self._live.last_fetch

    @property
    def last_delivery(self) -> float:
        """When (``time.monotonic()``) a fetch last brought deliveries."""
        return self._live.last_delivery

    @property
    def stall_after(self) -> float:
        """Seconds of failing fetches, or of work left waiting undelivered
        while there was room, after which this subscription is no longer
        alive / healthy (``STALL_AFTER`` unless given)."""
        return self._live.stall_after

    @stall_after.setter
    def stall_after(self, seconds: float) -> None:
        self._live.stall_after = seconds

    @property
    def alive(self) -> bool:
        """The fetch loop is running, has polled recently, its consumer has
        not failed for good, and its fetches have not been failing for
        longer than ``stall_after``.  Asks the broker nothing."""
        return self._live.alive(not self._stopping and self._threads[0].is_alive())

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
        with self._cond:
            held = len(self._pending) + self._running + self._settling
            if self._live.busy(held >= self._win.size):
                return False
        try:
            waiting: int | None = self._waiting()
        except Exception as e:  # the broker cannot tell: fetch failures say the rest
            log.debug("kew: cannot count what waits on %s: %s", self.name, e)
            waiting = None
        return self._live.stalled(waiting)

    # -- loops ------------------------------------------------------------

    def _fetch_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    resize = self._win.adapt(self._running)
                    while not resize and not self._stopping and not (room := self._room()):
                        self._cond.wait(self._poll)
                        self._live.polled()
                        resize = self._win.adapt(self._running)  # long handlers shrink it
                    if self._stopping or self._live.error is not None:
                        return
                    starved = len(self._pending) + self._running < self.concurrency
                if resize:
                    self._resize(*resize)
                    continue
                start = time.monotonic()
                batch = self._fetch(room)
                if not batch:
                    continue
                if self._win.policy is not None:
                    took, size = time.monotonic() - start, sum(len(d.message.body) for d in batch)
                    with self._cond:
                        self._win.policy.delivered(len(batch), size)
                        if starved:
                            self._win.policy.fetched(took)
                if self._inline:  # its acks committed here, before the next fetch
                    run_batch(self, batch)
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
            with self._cond:
                self._live.failed_for_good(e)
                self._cond.notify_all()
            return ()
        except Exception as e:
            self._live.failed(e)
            self._wait_stopping(1.0)
            return ()
        self._live.fetched(len(batch))
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
        start = time.monotonic()
        ack = handed = False
        took: float | None = None  # the handler's time (not its ack's)
        try:
            result = self._handler(self._consumer, delivery)
            ack, handed = result is True, result is HANDED_OVER
            took = time.monotonic() - start
            if ack and not self._win.grouped:
                # No slack for deliveries settling (nothing could join a
                # group without holding up a handler): at once, here.
                self._consumer.ack(delivery)
                ack = False
        except Exception:
            log.exception("kew: handler for %s failed outside the sink; handing back", self.name)
            self._settle_safely(self._consumer.release, delivery)
        finally:
            if took is None:
                took = time.monotonic() - start
            with self._cond:
                if ack:
                    self._settling += 1  # held until its ack is committed
                self._running -= 1
                if not handed:  # (else the hand-over counts it: Handover.ran)
                    self.handled += 1
                    if self._win.policy is not None:
                        self._win.policy.ran(took)
                self._wake()
        if ack:
            self._ack_later(delivery)

    def hold(self) -> Callable[[], None]:
        """For a handler that returns before its delivery is settled (a
        settle left to a group commit): the delivery stays counted as held
        (against the window, and waited for by ``stop()``) until the
        returned function is called, once, when it is settled or failed."""
        with self._cond:
            return self._hold()

    def hand_over(self) -> Handover:
        """For a handler whose work goes on after it returns (it returns
        :data:`HANDED_OVER`): the delivery stays counted as running (against
        the concurrency and the window, and waited for by ``stop()``) until
        :meth:`Handover.ran`, with the time it reports as the handler's
        (the adaptive window's), then as settling until
        :meth:`Handover.done`."""
        with self._cond:
            self._running += 1
        return Handover(self)

    def _hold(self) -> Callable[[], None]:
        self._settling += 1
        since = time.monotonic()
        called = False

        def done() -> None:
            nonlocal called
            with self._cond:
                if not called:
                    called = True
                    self._settling -= 1
                    if self._win.policy is not None:
                        self._win.policy.settled(time.monotonic() - since)
                    self._wake()

        return done

    def ack(self, delivery: Delivery) -> None:
        """Ack ``delivery`` (once its handler has returned): while the
        window exceeds the concurrency, in a group with others (one broker
        call for all handed over meanwhile, on a thread of the
        subscription's: see :class:`GroupAck`), and it returns at once; the
        delivery stays counted as held until the ack is committed, and is
        handed back if that fails.  Else at once, on this thread."""
        with self._cond:
            grouped = self._win.grouped
            if grouped:
                self._settling += 1
        if grouped:
            self._ack_later(delivery)
        else:
            self._consumer.ack(delivery)

    def _ack_later(self, delivery: Delivery) -> None:
        """(``_settling`` counts it already.)"""
        if not self._acks.ack_later(delivery):  # stopped: the group is closed
            self._settle_safely(self._consumer.ack, delivery)
            self._committed([delivery], None, None)

    def _committed(
        self, deliveries: list[Delivery], returned: float | None, error: BaseException | None
    ) -> None:
        """A group's end: ``deliveries`` acked (or failed: handed back);
        ``returned``: when their handlers returned, on average."""
        if error is not None:
            log.error(
                "kew: acking %d deliveries of %s failed (%s); they will be delivered again",
                len(deliveries),
                self.name,
                error,
            )
            for delivery in deliveries:
                self._settle_safely(self._consumer.release, delivery)
        now = time.monotonic()
        with self._cond:
            self._settling -= len(deliveries)
            if self._win.policy is not None and returned is not None:
                self._win.policy.settled(now - returned, len(deliveries))
            self._wake()

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
        # The acks of handlers that returned are committed, not handed back.
        self._acks.close(max(1.0, deadline - time.monotonic()))
        with self._cond:
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
        self._live.stall_after = stall_after

    def _batch_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping or self._live.error is not None:
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
