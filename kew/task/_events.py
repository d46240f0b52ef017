"""Task events: out of a worker, into the store, and the attempts running.

* :class:`Emitter`: the events a process makes go to its ``on_event``
  listeners (:meth:`Emitter.tell`) and, group-committed, to the app's events
  queue (:meth:`Emitter.emit`); :meth:`Emitter.pack` joins the event
  messages of one group commit into as few JSON arrays as fit.
* :class:`Running`: the attempts running in this process (the worker's
  shutdown hands them back), with the flusher that sends their buffered
  output every :data:`~kew.task.context.FLUSH_INTERVAL`.
* :class:`Recorder`: the loop that applies the events queue to a task store.

Package-internal: :class:`~kew.task.App` makes one Emitter and one Running;
the attempt state machine (``kew.task._attempt``) and the worker use them
through these public methods.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

from kew.qchan import Queue, Subscription
from kew.qchan._message import H_CONTENT_TYPE, new_id
from kew.qchan.codec import JSON, DecodeError
from kew.qchan.runtime import BatchSubscription, GroupCommit
from kew.qchan.spi import Connector, Consumer, Delivery, Message, now_ms
from kew.task.context import FLUSH_INTERVAL, TaskContext
from kew.task.model import EventMessage, TaskEvent
from kew.task.store import TaskStore

__all__ = [
    "PACK_BYTES",
    "RECORDER_BATCH",
    "Emitter",
    "Recorder",
    "Running",
    "chunks",
    "new_worker_id",
]

log = logging.getLogger("kew.task")

#: Event messages a recorder applies in one store transaction at most.
RECORDER_BATCH = 512

#: Largest body of one packed event message (a JSON array of TaskEvents).
PACK_BYTES = 256 * 1024


def new_worker_id() -> str:
    """``host:pid:random``: a worker's id in its events and heartbeats."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


def chunks(events: Sequence[TaskEvent]) -> list[list[TaskEvent]]:
    """``events`` cut into lists of at most about :data:`PACK_BYTES` each
    (one event message per list)."""
    out: list[list[TaskEvent]] = [[]]
    size = 0
    for e in events:
        n = 256 + len(e.text) + len(e.error)
        if out[-1] and size + n > PACK_BYTES // 2:
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out if out[0] else []


class Emitter:
    """Where the task events of this process go: listeners, then the
    app's events queue (``queue``), group-committed."""

    def __init__(self, queue: Queue[EventMessage], connector: Connector, *, enabled: bool) -> None:
        self.queue = queue
        self.enabled = enabled
        self._max_size = connector.max_message_size
        self._listeners: list[Callable[[TaskEvent], None]] = []
        # events of concurrent handlers go out together, packed (see pack)
        self._commit: GroupCommit[Sequence[TaskEvent]] = GroupCommit(
            lambda batches: queue.send_many(chunks([e for b in batches for e in b]))
        )

    def add_listener(self, listener: Callable[[TaskEvent], None]) -> None:
        """Call ``listener`` with every event :meth:`tell` is given."""
        self._listeners.append(listener)

    def tell(self, event: TaskEvent) -> None:
        """Hand ``event`` to the listeners (a failing one is logged)."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("kew: an on_event listener failed")

    def emit(self, events: Sequence[TaskEvent]) -> None:
        """Send ``events`` to the events queue (with those of concurrent
        callers); returns once they are stored.  Nothing when disabled."""
        if self.enabled and events:
            self._commit.submit(events)

    @property
    def outbox(self) -> bool:
        """Can events go out in a group commit with acks (see
        ``GroupSettle``)?  Not when the events queue has a ``max_depth`` to
        check on every send."""
        return self.queue.max_depth is None

    def message(self, events: Sequence[TaskEvent]) -> Message:
        """``events`` as one message for the events queue (a JSON array)."""
        return self.queue.message(list(events))

    def pack(self, queue: str, messages: list[Message]) -> list[Message]:
        """GroupSettle's ``pack``: the event messages of one group commit
        (each a JSON array, one per attempt) joined into as few arrays as
        :data:`PACK_BYTES` allows, without decoding them.  Other queues'
        messages are left as they are."""
        if queue != self.queue.name or len(messages) < 2:
            return messages
        limit = min(PACK_BYTES, self._max_size)
        out: list[Message] = []
        parts: list[bytes] = []
        size = 2
        head = messages[0]  # its headers (content type, type) serve the pack

        def pack() -> None:
            body = b"[" + b",".join(parts) + b"]"
            out.append(Message(new_id(), body, head.headers, head.durable))

        for m in messages:
            body = m.body
            if m.headers.get(H_CONTENT_TYPE) != JSON:
                out.append(m)
                continue
            inner = body[1:-1] if body[:1] == b"[" else body
            if not inner:
                continue
            if parts and size + len(inner) + 1 > limit:
                pack()
                parts, size = [], 2
            if not parts:
                head = m
            parts.append(inner)
            size += len(inner) + 1
        if parts:
            pack()
        return out


class Running:
    """The attempts running in this process, and the flusher that sends
    their buffered output (started with the first attempt)."""

    def __init__(self, emitter: Emitter) -> None:
        self._emitter = emitter
        self._lock = threading.Lock()
        self._active: dict[int, tuple[TaskContext, Delivery]] = {}
        self._dropped: set[int] = set()
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self, ctx: TaskContext, delivery: Delivery) -> None:
        """``ctx`` runs now, on ``delivery``."""
        with self._lock:
            self._active[id(ctx)] = (ctx, delivery)
            if self._flusher is None and self._emitter.enabled:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="kew-task-flusher", daemon=True
                )
                self._flusher.start()

    def end(self, ctx: TaskContext) -> None:
        """``ctx`` is over (settled, or handed back)."""
        with self._lock:
            self._active.pop(id(ctx), None)
            self._dropped.discard(id(ctx))

    def handed_back(self, ctx: TaskContext) -> bool:
        """Was ``ctx`` handed back (:meth:`hand_back`) while it ran?  Then
        its delivery is not the runner's to settle any more."""
        with self._lock:
            return id(ctx) in self._dropped

    def active(self) -> list[TaskContext]:
        """Attempts running in this process now."""
        with self._lock:
            return [c for c, _ in self._active.values()]

    def hand_back(self, contexts: Sequence[TaskContext]) -> None:
        """These attempts were handed back (worker shutdown): cancel them,
        and record them as queued again with what they logged."""
        events: list[TaskEvent] = []
        with self._lock:
            for ctx in contexts:
                ctx.handed_back = True  # (before any is cancelled: none of them starts)
                if id(ctx) in self._active:
                    self._dropped.add(id(ctx))
        for ctx in contexts:
            ctx.cancelled.set()
            ctx.log(f"[kew] worker {ctx.worker} stopped: attempt {ctx.attempt} handed back")
            batch = ctx.take()
            released = ctx.event("released")
            self._emitter.tell(released)
            events += batch
            events.append(released)
        try:
            self._emitter.emit(events)
        except Exception:
            log.exception("kew: cannot record %d tasks handed back", len(contexts))

    def close(self) -> None:
        """Stop the flusher."""
        self._closing.set()

    def _flush_loop(self) -> None:
        while not self._closing.wait(FLUSH_INTERVAL):
            now = time.monotonic()
            for ctx in self.active():
                if ctx.due(now):
                    events = ctx.take()
                    for e in events:
                        if e.kind == "output":
                            self._emitter.tell(e)
                    try:
                        self._emitter.emit(events)
                    except Exception:
                        log.exception("kew: sending the output of task %s failed", ctx.id)
                        ctx.put_back(events)


class Recorder:
    """Applies the events queue to a task store, a batch of up to
    :data:`RECORDER_BATCH` event messages per transaction; drops final
    tasks older than ``retention_days`` every ``prune_interval`` seconds."""

    def __init__(
        self,
        events: Queue[EventMessage],
        store: TaskStore,
        *,
        retention_days: float,
        prune_interval: float,
    ) -> None:
        self.events = events
        self.store = store
        self.retention_days = retention_days
        self.prune_interval = prune_interval
        self._last_prune = 0.0

    def subscribe(self, connector: Connector) -> Subscription:
        """Start applying (one batch loop); stop the returned subscription."""
        self.events.declare()
        consumer = connector.consumer(self.events.name, RECORDER_BATCH)
        return BatchSubscription(
            consumer, self.apply, name=self.events.name, prefetch=RECORDER_BATCH
        )

    def apply(self, consumer: Consumer, batch: Sequence[Delivery]) -> None:
        """Apply ``batch`` in one store transaction, then ack it; a body
        that is not an event (or an array of them) goes to the dead letters."""
        decode = self.events.codec.decode
        events: list[TaskEvent] = []
        good: list[Delivery] = []
        for d in batch:
            try:
                body = decode(d.message.body)
                if isinstance(body, list):
                    events += body
                else:
                    events.append(body)
                good.append(d)
            except DecodeError as e:
                consumer.dead_letter(d, f"cannot decode as TaskEvent: {e}")
        self.store.apply(events)
        for d in good:
            consumer.ack(d)
        if time.monotonic() - self._last_prune > self.prune_interval:
            self._last_prune = time.monotonic()
            self.prune()

    def prune(self) -> None:
        """Drop the final tasks older than ``retention_days`` (logged)."""
        retention_ms = int(self.retention_days * 86_400_000)
        try:
            n = self.store.prune(now_ms() - retention_ms)
            if n:
                log.info("kew: pruned %d tasks older than %s days", n, self.retention_days)
        except Exception:
            log.exception("kew: pruning the task store failed")
