"""Submitting tasks: each task's message and its ``queued`` event in one
round trip, and concurrent submits sharing round trips.

A submit builds, in its caller's thread, the task's message (checked
against the queue's type and size: an error there is that caller's alone,
and nothing is sent) and its ``queued`` event message.  Then it joins the
app's group commit (:class:`GroupCommit`, leader and followers): the caller
that finds no commit under way sends its part at once; those that come
meanwhile are sent together by one of them in the next commit: every task
of the group, and all their events packed in one events message
(``Emitter.pack``), with one :meth:`~kew.qchan.spi.MultiSender.send_to`:
one round trip where the connector has it (RabbitMQ, Redis, SQLite,
memory), else one ``send_many`` per queue.  Each call returns once its own
messages are durable; if a commit fails, every caller of that group gets
the error, and its task may or may not be queued (as after a failed
``send``).

A task queue (or an events queue) with a ``max_depth`` takes the old road:
the depth checked, the task sent, then its event (a failing event logged,
not raised: the task is queued).

``submit_async`` does the same for coroutines, with a group commit per
event loop (:class:`~kew.qchan._commit.LoopGroupCommit`: the coroutines of
one turn go out together), through kew.aio's
connector for the app's (:func:`kew.aio.from_sync`): its native route when
it sends to several queues (:class:`~kew.qchan.spi.aio.AsyncMultiSender`:
memory, SQLite, Redis, RabbitMQ), else the sync ``send_to`` in a thread of
the loop's executor (the thread bridge's way, STOMP today: the loop never
blocks, one thread waits per commit).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kew.core.msg import FutureTimepoint
from kew.qchan import Queue
from kew.qchan._commit import LoopGroupCommit
from kew.qchan.spi import Connector, Message, MessageTooLarge, MultiSender, now_ms
from kew.qchan.spi.aio import AsyncConnector, AsyncMultiSender
from kew.task._events import Emitter, chunks
from kew.task.model import TaskEvent

if TYPE_CHECKING:
    from kew.task._attempt import TaskQueue
    from kew.task.app import App

__all__ = ["Submitter", "submitter"]

T = TypeVar("T")
log = logging.getLogger("kew.task")


def deliver_at(delay: float | None) -> int | None:
    """The due time (epoch ms) for ``delay`` seconds from now (None: now)."""
    if delay is None:
        return None
    if not delay >= 0:
        raise ValueError(f"delay must be a non-negative number of seconds, not {delay!r}")
    return FutureTimepoint.after(delay).epoch_ms


class Part:
    """One caller's share of a commit: its tasks' messages, their events,
    and those events as messages for the events queue; once committed,
    ``finished`` and its ``error`` (None: durable)."""

    __slots__ = ("error", "event_messages", "events", "finished", "tasks", "wake")

    def __init__(
        self,
        tasks: list[tuple[str, Message]],
        events: list[TaskEvent],
        event_messages: list[Message],
    ) -> None:
        self.tasks = tasks
        self.events = events
        self.event_messages = event_messages
        self.finished = False
        self.error: BaseException | None = None
        self.wake = threading.Event()  # committed, or handed the lead

    @property
    def ids(self) -> list[str]:
        return [m.id for _, m in self.tasks]


class GroupCommit:
    """Callers' parts committed in groups, leader and followers: a caller
    that finds no commit under way leads (commits every part waiting, its
    own included); one that comes meanwhile waits on its part's event.  The
    leader wakes the callers of its group, and hands the lead to the first
    part still waiting, whose caller commits the next group.  So a caller
    commits at most the group holding its own part: under a steady stream
    of submits no thread is kept committing for the others.  (With
    ``kew.qchan.runtime.GroupCommit``, whose first caller commits until
    nothing is left, 16 threads submitting for 4 s saw one call take 1.0
    to 2.2 s on Redis, 2.1 to 3.9 s on RabbitMQ; with this, 88 to 330 ms
    and 131 to 340 ms, at the same rate or better.)"""

    def __init__(self, commit: Callable[[list[Part]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._pending: list[Part] = []
        self._leading = False

    def run(self, part: Part) -> None:
        """Return once ``part`` is committed; raise its group's error."""
        with self._lock:
            self._pending.append(part)
            lead = not self._leading
            self._leading = True
        while not lead:
            part.wake.wait()
            if part.finished:
                break
            lead = True  # handed the lead: the part is still waiting
        if lead:
            self._lead()
        if part.error is not None:
            raise part.error

    def _lead(self) -> None:
        with self._lock:
            group, self._pending = self._pending, []
        error: BaseException | None = None
        try:
            self._commit(group)
        except BaseException as e:  # every caller of the group hears it
            error = e
        with self._lock:
            after = self._pending[0] if self._pending else None
            self._leading = after is not None
        for p in group:
            p.error, p.finished = error, True
            p.wake.set()
        if after is not None:
            after.wake.set()


class Submitter:
    """The submits of one app: a group commit for threads, one per event
    loop for coroutines."""

    def __init__(self, connector: Connector, emitter: Emitter) -> None:
        self._connector = connector
        self._emitter = emitter
        # (its send_to looked up at each call: a test may wrap it to count)
        self._multi: MultiSender | None = connector if isinstance(connector, MultiSender) else None
        #: Queues by name: their producers, when the connector has no send_to.
        self._queues: dict[str, Queue[Any]] = {}
        self._declared: set[str] = set()
        self._group = GroupCommit(self._commit)
        self._lock = threading.Lock()
        self._aio: AsyncConnector | None = None
        self._async_group: LoopGroupCommit[Part] = LoopGroupCommit(self._commit_async)

    # -- what a submit sends ----------------------------------------------------

    def one_trip(self, tq: TaskQueue[Any]) -> bool:
        """Can ``tq``'s submits go out in one send (no ``max_depth`` to check
        on the task queue or the events queue)?"""
        return tq.queue.max_depth is None and (
            not self._tracks(tq) or self._emitter.queue.max_depth is None
        )

    def _tracks(self, tq: TaskQueue[Any]) -> bool:
        return tq.track and self._emitter.enabled

    def part(
        self, tq: TaskQueue[T], items: Sequence[tuple[T, str | None]], due: int | None
    ) -> Part:
        """The messages for ``items`` (value, id) on ``tq`` and their
        ``queued`` events; raises (nothing sent) if one is not valid."""
        queue = tq.queue
        tasks = [(tq.name, queue.message(data, due, id=id)) for data, id in items]
        events: list[TaskEvent] = []
        messages: list[Message] = []
        if self._tracks(tq):
            at = now_ms()
            events = [TaskEvent(m.id, tq.name, "queued", at, next_at=due) for _, m in tasks]
            messages = [m for c in chunks(events) for m in self._event_messages(c)]
        return Part(tasks, events, messages)

    def _event_messages(self, events: list[TaskEvent]) -> list[Message]:
        """``events`` as one message, or several if one would be over the
        connector's ``max_message_size``."""
        try:
            return [self._emitter.message(events)]
        except MessageTooLarge:
            if len(events) == 1:
                raise
            half = len(events) // 2
            return self._event_messages(events[:half]) + self._event_messages(events[half:])

    def _queues_of(self, tq: TaskQueue[Any]) -> list[Queue[Any]]:
        """The queues ``tq``'s submits write to, remembered for the fallback."""
        queues: list[Queue[Any]] = [tq.queue]
        if self._tracks(tq):
            queues.append(self._emitter.queue)
        for q in queues:
            self._queues.setdefault(q.name, q)
        return queues

    def _undeclared(self, tq: TaskQueue[Any]) -> list[Queue[Any]]:
        with self._lock:
            return [q for q in self._queues_of(tq) if q.name not in self._declared]

    def _declare(self, queues: list[Queue[Any]]) -> None:
        for q in queues:
            q.declare()
        with self._lock:
            self._declared.update(q.name for q in queues)

    def _told(self, part: Part) -> None:
        for event in part.events:
            self._emitter.tell(event)

    def _sends(self, parts: Sequence[Part]) -> list[tuple[str, Message]]:
        """The messages of a batch: every task, then the events packed."""
        sends = [s for p in parts for s in p.tasks]
        name = self._emitter.queue.name
        events = [m for p in parts for m in p.event_messages]
        return sends + [(name, m) for m in self._emitter.pack(name, events)]

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """One ``send_to`` on the connector, else one ``send_many`` per queue."""
        if self._multi is not None:
            self._multi.send_to(sends)
            return
        by_queue: dict[str, list[Message]] = {}
        for queue, m in sends:
            by_queue.setdefault(queue, []).append(m)
        for queue, messages in by_queue.items():
            self._queues[queue].producer.send_many(messages)

    # -- sync -------------------------------------------------------------------

    def submit(
        self, tq: TaskQueue[T], items: Sequence[tuple[T, str | None]], due: int | None
    ) -> list[str]:
        """Queue ``items`` (validated already) on ``tq``; their ids."""
        if not items:
            return []
        if not self.one_trip(tq):
            return self._one_by_one(tq, items, due)
        part = self.part(tq, items, due)
        if undeclared := self._undeclared(tq):
            self._declare(undeclared)
        self._group.run(part)
        self._told(part)
        return part.ids

    def _commit(self, parts: list[Part]) -> None:
        self.send_to(self._sends(parts))

    def _one_by_one(
        self, tq: TaskQueue[T], items: Sequence[tuple[T, str | None]], due: int | None
    ) -> list[str]:
        """With a ``max_depth``: the tasks (the depth checked first), then
        their events; a failing event is logged (the tasks are queued)."""
        part = self.part(tq, items, due)
        messages = [m for _, m in part.tasks]
        tq.queue._check_depth(len(messages))  # QueueFull, as Queue.send
        tq.queue.producer.send_many(messages)
        self._told(part)
        try:
            self._emitter.emit(part.events)
        except Exception:  # the tasks are queued: their status shows once they run
            log.exception(
                "kew: %d task(s) are queued on %s but their 'queued' events failed",
                len(messages),
                tq.name,
            )
        return part.ids

    # -- async ------------------------------------------------------------------

    async def submit_async(
        self, tq: TaskQueue[T], items: Sequence[tuple[T, str | None]], due: int | None
    ) -> list[str]:
        """:meth:`submit` for a coroutine: the loop never blocks."""
        loop = asyncio.get_running_loop()
        if not items:
            return []
        if not self.one_trip(tq):
            return await loop.run_in_executor(None, self._one_by_one, tq, items, due)
        part = self.part(tq, items, due)
        if undeclared := self._undeclared(tq):  # (a round trip: in a thread, once)
            await loop.run_in_executor(None, self._declare, undeclared)
        await self._async_group.submit(part)
        self._told(part)
        return part.ids

    async def _commit_async(self, parts: list[Part]) -> None:
        sends = self._sends(parts)
        aio = self._async_connector()
        if isinstance(aio, AsyncMultiSender):  # the provider's native route
            await aio.send_to(sends)
            return
        await asyncio.get_running_loop().run_in_executor(None, self.send_to, sends)

    def _async_connector(self) -> AsyncConnector:
        """kew.aio's connector for the app's (the native route when the
        provider has one, else the thread bridge), made once.  Never closed
        here: it would close the app's connector, which closes what it uses."""
        if self._aio is None:
            from kew.aio import from_sync

            with self._lock:
                if self._aio is None:
                    self._aio = from_sync(self._connector)
        return self._aio


_submitters: weakref.WeakKeyDictionary[App, Submitter] = weakref.WeakKeyDictionary()
_submitters_lock = threading.Lock()


def submitter(app: App) -> Submitter:
    """The app's submitter, made at its first submit."""
    found = _submitters.get(app)
    if found is None:
        with _submitters_lock:
            found = _submitters.get(app)
            if found is None:
                found = _submitters[app] = Submitter(app.connector, app.emitter)
    return found


def items_of(tq: TaskQueue[T], items: Iterable[T]) -> list[tuple[T, str | None]]:
    """``items`` as (value, no id) pairs, each validated first (nothing is
    sent if one is not valid)."""
    out: list[tuple[T, str | None]] = [(data, None) for data in items]
    for data, _ in out:
        tq.validate(data)
    return out
