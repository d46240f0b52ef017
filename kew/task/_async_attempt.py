"""The async route of a task queue's attempts: an ``async def`` handler's
attempt is handed to the app's event loop by the handler thread, runs there
to its end, and is finished in batches by its lane's finisher thread
(:mod:`kew.task._async_run` has the route; this module joins it to the
attempt's state machine in :mod:`kew.task._attempt`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from kew.qchan.runtime import GroupSettle, Subscription
from kew.qchan.spi import Delivery, Message
from kew.task._async_run import Job, Lane
from kew.task._events import chunks
from kew.task.model import TaskEvent

if TYPE_CHECKING:
    from kew.task._attempt import TaskQueue, _Attempt

__all__ = ["AsyncRoute", "Pending"]

log = logging.getLogger("kew.task")

Pending = tuple[
    Delivery,
    Sequence[TaskEvent],
    Sequence[tuple[str, Message]],
    Callable[[BaseException | None], None],
]
"""A settle to commit with those of the same finisher batch: the delivery
to ack, the events and the other messages to store first, what to call
once committed."""


class AsyncRoute:
    """The async attempts of one subscription of ``tq``: at most
    ``concurrency`` coroutines at once; those ending together settle
    together through ``settler``.  :attr:`sub` is set once the
    subscription exists (the fetch thread may start before: it waits)."""

    def __init__(self, tq: TaskQueue[Any], concurrency: int, settler: GroupSettle) -> None:
        self.tq = tq
        self.settler = settler
        self._sub: Subscription | None = None
        self._ready = threading.Event()
        self.lane = Lane(tq.app.event_loop, concurrency, tq.name, self._finish, tq.time_limit)

    @property
    def sub(self) -> Subscription | None:
        """The subscription whose attempts these are."""
        return self._sub

    @sub.setter
    def sub(self, sub: Subscription) -> None:
        self._sub = sub
        self._ready.set()

    def hand_over(self, att: _Attempt, data: object) -> bool:
        """Hand ``att`` (its ``running`` status out already) to the loop;
        False if it must run on this thread instead."""
        sub = self._sub
        if sub is None:  # (its threads start before the constructor returns)
            self._ready.wait(5.0)
            sub = self._sub
            if sub is None:
                return False
        att.handover = handover = sub.hand_over()
        fn = cast("Callable[[Any], Awaitable[object]]", self.tq.handler)
        try:
            self.lane.hand_over(fn, data, att.ctx, att)
        except BaseException:
            handover.done()  # (not handed over: the caller hands the delivery back)
            raise
        return True

    def _finish(self, jobs: list[Job]) -> None:
        """On the lane's finisher: the rest of each attempt, as for a sync
        handler; their settles in one group commit."""
        tq = self.tq
        running = tq.app.running
        batch: list[Pending] = []
        for job in jobs:
            att = cast("_Attempt", job.owner)
            handover = att.handover
            assert handover is not None
            handover.ran(job.ran, job.ended)
            att.hold = lambda h=handover: h.done  # (the delivery is held already)
            att.batch = batch
            try:
                error = job.error
                if error is not None:
                    tq.noted(att.ctx, error, error.__traceback__)
                tq._after(att, error)
            except Exception:
                log.exception(
                    "kew: %s: ending task %s failed; handing it back", tq.name, att.ctx.id
                )
                try:
                    att.consumer.release(att.delivery)
                except Exception:
                    log.exception("kew: handing back task %s failed", att.ctx.id)
            finally:
                running.end(att.ctx)
                if not att.held:  # settled (or handed back) already: no longer held
                    handover.done()
        if batch:
            self._commit(batch)

    def _commit(self, batch: list[Pending]) -> None:
        """One group commit for ``batch``: the events of all its attempts
        in as few messages as fit (one message id each, not one a task),
        the next attempts, then the acks."""
        emitter = self.tq.app.emitter
        events = [e for _, evs, _, _ in batch for e in evs]
        sends = [(emitter.queue.name, emitter.message(part)) for part in chunks(events)]
        sends += [send for _, _, more, _ in batch for send in more]
        acks = [delivery for delivery, _, _, _ in batch]

        def done(error: BaseException | None) -> None:
            for *_, each in batch:
                each(error)

        self.settler.settle_later(acks, sends, done)
