"""The task layer's types: what travels as messages and what a store keeps.

Everything here is a msgspec Struct, so it is its own schema: the task
events and outcomes are kew messages like any other (JSON by default), and a
program in another language can read them (docs/tasks.md).

A task's life::

    queued -> running -> (retry-scheduled -> running)* -> succeeded | failed
                                                        | cancelled (on request, any time before)

Workers do not write status anywhere local: each change (and each chunk of
the task's output) is a :class:`TaskEvent` sent to the app's events queue;
a recorder consumes those into a :class:`~kew.task.store.TaskStore` that any
process (the REST front end, the CLI) reads.  So a task's status and output
are visible from machines other than the worker's.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

import msgspec

T = TypeVar("T")

TaskStatus = Literal["queued", "running", "retry-scheduled", "succeeded", "failed", "cancelled"]
"""Where a task is in its life."""

FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""The statuses a task does not leave: ``succeeded``, ``failed`` and ``cancelled``."""

EventKind = Literal[
    "queued",  # submitted; the task message is on its queue
    "running",  # attempt ``attempt`` started on ``worker``
    "output",  # ``text`` is the next chunk of the attempt's output (``seq`` orders them)
    "retry-scheduled",  # attempt failed with ``error``; the next runs at ``next_at``
    "succeeded",  # final
    "failed",  # final: permanent error, or retries exceeded; ``error`` says which
    "worker",  # a worker's heartbeat: ``worker`` is alive, ``text`` lists its queues
    "released",  # the run was handed back unfinished (worker shutdown): queued again
    "cancelled",  # final: a cancel was asked for; the attempt stopped (or never started)
    "cancel-requested",  # someone asked to cancel the task (``text`` says who): no status change
]

STATUS_RANK: dict[str, int] = {
    "queued": 0,
    "running": 1,
    "retry-scheduled": 2,
    "released": 2,
    "succeeded": 3,
    "failed": 3,
    "cancelled": 3,
}
"""Rank of a status-changing event within one attempt, so that a store
applying events out of order (a redelivery) never moves a task backwards."""


class TaskEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One change of a task, as a message on the app's events queue.

    ``(task_id, attempt, kind, seq)`` identifies an event: a store applies
    each once, whatever the redeliveries.  ``at`` is epoch ms.

    ``run`` (epoch ms at which this run started) tells apart two runs of the
    same attempt: a task whose worker crashed or handed it back at shutdown
    runs its attempt again.  A store orders status by ``(attempt, run,
    STATUS_RANK)`` and output by ``(attempt, run, seq)``.
    """

    task_id: str
    queue: str
    kind: EventKind
    at: int
    attempt: int = 0
    seq: int = 0
    worker: str = ""
    text: str = ""
    error: str = ""
    next_at: int | None = None
    run: int = 0


EventMessage = TaskEvent | list[TaskEvent]
"""The body of a message on an app's events queue: one event, or (what
workers send) a JSON array of the events of every attempt that ended in one
group commit, so that N tasks cost one event message, not N."""


class TaskRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a store knows of a task: the REST status document."""

    id: str
    queue: str
    status: TaskStatus
    attempt: int
    created_at: int
    updated_at: int
    started_at: int | None = None
    finished_at: int | None = None
    next_at: int | None = None
    last_error: str = ""
    worker: str = ""
    #: When a cancel was first asked for (epoch ms), if ever: the task ends
    #: ``cancelled`` once a worker acts on it (see docs/tasks.md, "Cancel").
    cancel_requested_at: int | None = None

    @property
    def final(self) -> bool:
        """Whether the task is done for good (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES


class WorkerRecord(msgspec.Struct, frozen=True):
    """A worker as last seen through its heartbeat events."""

    id: str
    queues: str
    last_seen: int


OutcomeKind = Literal["succeeded", "attempt-failed", "failed"]


class Outcome(msgspec.Struct, Generic[T], frozen=True, omit_defaults=True):
    """A task's outcome, on the typed notification channel of its queue
    (``TaskQueue.outcomes``): every failed attempt, and the final result.

    ``data`` is the task's own value, so a notifier can tell whom to tell
    (the requester's address is usually in it).
    """

    task_id: str
    queue: str
    kind: OutcomeKind
    attempt: int
    at: int
    data: T
    error: str = ""
    next_at: int | None = None
