"""Finding tasks: the filters of ``GET /tasks`` and of the page.

:func:`search_tasks` asks the store's ``search`` (see
:meth:`kew.task.store.TaskStore.search` for the semantics); a store without
one (an older or third-party store) is read with ``recent()`` and filtered
here, over at most :data:`FALLBACK_SCAN` of its newest tasks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

from kew.task.model import TaskRecord, TaskStatus

#: The task statuses, in life order.
STATUSES: tuple[str, ...] = get_args(TaskStatus)
#: How many of the newest tasks the fallback (a store without ``search``) looks at.
FALLBACK_SCAN = 20_000


@dataclass(frozen=True)
class TaskQuery:
    """Which tasks: every given filter must match (an empty one matches all).

    ``since``/``until`` bound ``created_at`` (epoch ms; ``since`` included,
    ``until`` excluded); ``updated_since`` bounds ``updated_at``; ``error``
    is a case-insensitive substring of ``last_error``; ``worker`` the exact
    worker id.  Newest first (by ``created_at``, then ``id``), ``offset``
    skipped, at most ``limit``.
    """

    queues: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    since: int | None = None
    until: int | None = None
    updated_since: int | None = None
    error: str = ""
    worker: str = ""
    limit: int = 50
    offset: int = 0

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        return bool(
            self.queues
            or self.statuses
            or self.since is not None
            or self.until is not None
            or self.updated_since is not None
            or self.error
            or self.worker
        )

    def matches(self, r: TaskRecord) -> bool:
        """Whether ``r`` passes every filter (the store-independent rule)."""
        return (
            (not self.queues or r.queue in self.queues)
            and (not self.statuses or r.status in self.statuses)
            and (self.since is None or r.created_at >= self.since)
            and (self.until is None or r.created_at < self.until)
            and (self.updated_since is None or r.updated_at >= self.updated_since)
            and (not self.error or self.error.lower() in r.last_error.lower())
            and (not self.worker or r.worker == self.worker)
        )


def search_tasks(store: Any, q: TaskQuery) -> list[TaskRecord]:
    """The tasks of ``store`` that ``q`` selects, newest first."""
    search = getattr(store, "search", None)
    if callable(search):
        found: Iterable[TaskRecord] = search(
            queues=list(q.queues) or None,
            statuses=list(q.statuses) or None,
            since=q.since,
            until=q.until,
            updated_since=q.updated_since,
            error=q.error or None,
            worker=q.worker or None,
            limit=q.limit,
            offset=q.offset,
        )
        return list(found)
    if not q.filtered:
        return list(store.recent(limit=q.offset + q.limit))[q.offset :]
    one_queue = q.queues[0] if len(q.queues) == 1 else None
    records = store.recent(limit=FALLBACK_SCAN, queue=one_queue)
    hits = [r for r in records if q.matches(r)]
    return hits[q.offset : q.offset + q.limit]


def to_ms(value: dt.datetime | None) -> int | None:
    """A datetime as epoch ms (a naive one is UTC); ValueError when out of range."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    try:
        return round(value.timestamp() * 1000)
    except (OverflowError, OSError) as e:
        raise ValueError(f"time out of range: {e}") from None


def parse_local(text: str | None) -> dt.datetime | None:
    """A time from the page's form (``YYYY-MM-DDTHH:MM[:SS]``, UTC), or None
    when empty; ValueError when not a time."""
    if not text or not text.strip():
        return None
    return dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
