"""Handlers run on the fetch thread (:class:`kew.qchan.runtime.Subscription`
with one handler, or ``inline``): a fetched batch at a time.

:func:`run_batch` takes the subscription's lock once before the batch and
once after it, not twice per delivery, and commits the acks of the batch in
one group on the fetch thread itself, before its next fetch: the same
round trips as a hand-written fetch / handle / ack loop, and no thread to
wake (a hand-over to the group's thread and back cost more than the ack:
figures in benchmarks/bench_redis.py --defaults).  Each ack still comes
after its own handler returned, and a failed commit hands the deliveries
back.

:class:`Handover` is a delivery whose handler handed its work on
(``Subscription.hand_over``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kew.qchan.spi import Delivery, OutboxConsumer

if TYPE_CHECKING:
    from kew.qchan.runtime import Subscription

log = logging.getLogger("kew.consumer")

HANDED_OVER = object()
"""What a handler returns when its work goes on elsewhere after it returns
(:meth:`Subscription.hand_over`): its return is not the end of its run."""


class Handover:
    """A delivery whose handler handed its work on (a coroutine on an event
    loop): counted as running until :meth:`ran`, then as settling until
    :meth:`done` (from :meth:`Subscription.hand_over`)."""

    __slots__ = ("_ran_at", "_state", "_sub")

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._state = 0  # 0 running, 1 settling, 2 done
        self._ran_at = 0.0

    def ran(self, seconds: float, ended: float | None = None) -> None:
        """The work ended (at ``ended``, ``time.monotonic()``; default now)
        after running ``seconds``: the window's handler time."""
        sub = self._sub
        with sub._cond:
            if self._state != 0:
                return
            self._state = 1
            self._ran_at = time.monotonic() if ended is None else ended
            sub._running -= 1
            sub._settling += 1
            sub.handled += 1
            if sub._win.policy is not None:
                sub._win.policy.ran(seconds)

    def done(self) -> None:
        """The delivery is settled (or handed back); once, later calls do
        nothing."""
        sub = self._sub
        with sub._cond:
            state, self._state = self._state, 2
            if state == 0:
                sub._running -= 1
                sub.handled += 1
            elif state == 1:
                sub._settling -= 1
                if sub._win.policy is not None:
                    sub._win.policy.settled(time.monotonic() - self._ran_at)
            else:
                return
            sub._wake()


def run_batch(sub: Subscription, batch: Sequence[Delivery]) -> None:
    """Run the handler on each delivery of ``batch``, in order, on this (the
    fetch) thread; then commit the acks of those that returned True in one
    group (while the window exceeds the concurrency; else each at once,
    before the next handler).  The batch counts as running until its end
    (what has not started is held all the same).  Once ``stop()`` is
    called, the rest is handed back; the acks gathered are committed."""
    consumer, handler = sub._consumer, sub._handler
    release = consumer.release
    clock = time.monotonic
    with sub._cond:
        sub._running += len(batch)
        grouped = sub._win.grouped  # (only this thread changes it)
    acks: list[Delivery] = []
    returned = 0.0  # the sum of the acks' handler return times
    ran = 0.0  # handler seconds
    finished = 0  # handlers that returned or raised (not handed over)
    try:
        t = clock()
        for i, delivery in enumerate(batch):
            if sub._stopping:
                for rest in batch[i:]:
                    sub._settle_safely(release, rest)
                break
            try:
                result = handler(consumer, delivery)
            except Exception:
                log.exception("kew: handler for %s failed outside the sink; handing back", sub.name)
                sub._settle_safely(release, delivery)
                result = None
            now = clock()
            if result is HANDED_OVER:  # hand_over() counts it (Handover.ran)
                t = now
                continue
            ran += now - t
            finished += 1
            if result is True:
                if grouped:
                    acks.append(delivery)
                    returned += now
                else:  # no slack for a group: at once, before the next one
                    try:
                        consumer.ack(delivery)
                    except Exception:
                        log.exception("kew: acking on %s failed; handing back", sub.name)
                        sub._settle_safely(release, delivery)
                    now = clock()
            t = now
    finally:
        with sub._cond:
            sub._running -= len(batch)
            sub._settling += len(acks)  # held until committed
            sub.handled += finished
            if sub._win.policy is not None and finished:
                sub._win.policy.ran(ran / finished, finished)
            sub._wake()
    if acks:
        commit(sub, acks, returned / len(acks))


def commit(sub: Subscription, acks: list[Delivery], returned: float) -> None:
    """Ack ``acks`` in one group (counted as settling), on this thread;
    ``returned``: when their handlers returned, on average."""
    consumer = sub._consumer
    error: BaseException | None = None
    try:
        if isinstance(consumer, OutboxConsumer):
            consumer.settle(acks, ())
        else:
            for delivery in acks:
                consumer.ack(delivery)
    except Exception as e:
        error = e
    sub._committed(acks, returned, error)
