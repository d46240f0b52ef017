"""The rules every task store shares (package-internal): a task's row after
an event (:func:`transition`, the ordering rules of :mod:`kew.task.store`),
the output of its chunks (:func:`join_output`), and how the SQL stores
(SQLite, PostgreSQL) map a row to columns (:data:`COLUMNS`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from msgspec.structs import replace

from kew.task.model import FINAL_STATUSES, STATUS_RANK, TaskEvent, TaskRecord, TaskStatus

__all__ = [
    "COLUMNS",
    "FINAL_SQL",
    "STATUS_KINDS",
    "Row",
    "join_output",
    "params_of",
    "row_of",
    "transition",
]

#: Event kinds that change a task's status.
STATUS_KINDS = frozenset(
    {"queued", "running", "retry-scheduled", "succeeded", "failed", "cancelled", "released"}
)


@dataclass(frozen=True, slots=True)
class Row:
    """A task record plus what ordering needs (the run of its status)."""

    record: TaskRecord
    run: int
    rank: int  # STATUS_RANK of the event that set the status ("released" ranks above "running")


def _status_of(kind: str) -> str:
    return "queued" if kind == "released" else kind


def _cancel_mark(row: Row | None, ev: TaskEvent) -> Row | None:
    """The row after a ``cancel-requested`` event: the first request's time
    kept, the status untouched (a placeholder if the task is new)."""
    if row is None:
        rec = TaskRecord(ev.task_id, ev.queue, "queued", 0, ev.at, ev.at, cancel_requested_at=ev.at)
        return Row(rec, 0, 0)
    old = row.record.cancel_requested_at
    if old is not None and old <= ev.at:
        return None
    return Row(replace(row.record, cancel_requested_at=ev.at), row.run, row.rank)


def transition(row: Row | None, ev: TaskEvent) -> Row | None:
    """The task's row after ``ev`` (a status, output or cancel-requested
    event), or None if ``ev`` changes nothing."""
    if ev.kind == "cancel-requested":
        return _cancel_mark(row, ev)
    if row is None:
        if ev.kind not in STATUS_KINDS:  # output before any status: a placeholder
            return Row(TaskRecord(ev.task_id, ev.queue, "queued", 0, ev.at, ev.at), 0, 0)
        base = TaskRecord(ev.task_id, ev.queue, "queued", 0, ev.at, ev.at)
        row = Row(base, 0, 0)
        if ev.kind == "queued":
            return Row(replace(base, attempt=ev.attempt, next_at=ev.next_at), ev.run, 0)
    rec = row.record
    if ev.kind not in STATUS_KINDS:
        return None
    if ev.at < rec.created_at:
        rec = replace(rec, created_at=ev.at)
    if ev.kind == "queued" and rec.status == "queued" and ev.attempt == 0 and rec.attempt == 0:
        # the submit's own event, after a placeholder: only times to fix
        if ev.next_at is not None and rec.next_at is None:
            rec = replace(rec, next_at=ev.next_at)
        return Row(rec, row.run, row.rank) if rec is not row.record else None
    new_key = (ev.attempt, ev.run, STATUS_RANK[ev.kind])
    old_key = (rec.attempt, row.run, row.rank)
    if ev.kind == "released":
        # only a run that is still shown running goes back to the queue
        if not (rec.status == "running" and (rec.attempt, row.run) == (ev.attempt, ev.run)):
            return Row(rec, row.run, row.rank) if rec is not row.record else None
    elif new_key <= old_key:
        if ev.error and not rec.last_error:  # an earlier attempt's error, late: still news
            rec = replace(rec, last_error=ev.error)
        return Row(rec, row.run, row.rank) if rec is not row.record else None
    status = _status_of(ev.kind)
    updated_at = max(rec.updated_at, ev.at)
    if ev.kind == "running":
        rec = replace(
            rec,
            status="running",
            attempt=ev.attempt,
            started_at=ev.at,
            finished_at=None,
            next_at=None,
            worker=ev.worker or rec.worker,
            updated_at=updated_at,
        )
    elif ev.kind == "retry-scheduled":
        rec = replace(
            rec,
            started_at=_started(rec, row, ev),
            status="retry-scheduled",
            attempt=ev.attempt,
            next_at=ev.next_at,
            last_error=ev.error or rec.last_error,
            worker=ev.worker or rec.worker,
            updated_at=updated_at,
        )
    elif ev.kind in FINAL_STATUSES:
        rec = replace(
            rec,
            started_at=_started(rec, row, ev),
            status=_FINAL[ev.kind],
            attempt=ev.attempt,
            finished_at=ev.at,
            next_at=None,
            last_error=ev.error if ev.kind == "failed" else rec.last_error,
            worker=ev.worker or rec.worker,
            updated_at=updated_at,
        )
    else:  # queued (a submit with an attempt) or released
        rec = replace(
            rec,
            status="queued",
            attempt=ev.attempt,
            next_at=ev.next_at,
            updated_at=updated_at,
        )
    assert rec.status == status
    return Row(rec, ev.run, STATUS_RANK[ev.kind])


_FINAL: dict[str, TaskStatus] = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


def _started(rec: TaskRecord, row: Row, ev: TaskEvent) -> int | None:
    """When the run that ``ev`` ends started: its ``run`` (a short attempt
    sends no "running" event of its own)."""
    if (rec.attempt, row.run) == (ev.attempt, ev.run) and rec.started_at is not None:
        return rec.started_at
    return ev.run or rec.started_at


def join_output(chunks: Iterable[tuple[int, int, str]]) -> str:
    """Chunks ``(attempt, run, text)`` in order -> the task's output, with a
    header line before each attempt after the first and each rerun."""
    parts: list[str] = []
    last: tuple[int, int] | None = None
    for attempt, run, text in chunks:
        if (attempt, run) != last:
            if last is not None or attempt > 1:
                if parts and not parts[-1].endswith("\n"):
                    parts.append("\n")
                if last is not None and last[0] == attempt:
                    parts.append(
                        f"--- attempt {attempt} (run again: its last run was interrupted) ---\n"
                    )
                else:
                    parts.append(f"--- attempt {attempt} ---\n")
            last = (attempt, run)
        parts.append(text)
    return "".join(parts)


# -- the SQL stores' columns ------------------------------------------------

COLUMNS = (
    "id, queue, status, attempt, run, rank, created_at, updated_at, started_at, finished_at, "
    "next_at, last_error, worker, cancel_requested_at"
)

#: SQL list of the final statuses (pruning, cancel marks).
FINAL_SQL = ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES))

Raw = tuple[
    str,
    str,
    str,
    int,
    int,
    int,
    int,
    int,
    "int | None",
    "int | None",
    "int | None",
    str,
    str,
    "int | None",
]


def row_of(raw: Raw) -> Row:
    (
        tid,
        queue,
        status,
        attempt,
        run,
        rank,
        created,
        updated,
        started,
        finished,
        nxt,
        err,
        worker,
        cancel_at,
    ) = raw
    rec = TaskRecord(
        tid,
        queue,
        status,  # type: ignore[arg-type]
        attempt,
        created,
        updated,
        started_at=started,
        finished_at=finished,
        next_at=nxt,
        last_error=err,
        worker=worker,
        cancel_requested_at=cancel_at,
    )
    return Row(rec, run, rank)


def params_of(row: Row) -> tuple[object, ...]:
    r = row.record
    return (
        r.id,
        r.queue,
        r.status,
        r.attempt,
        row.run,
        row.rank,
        r.created_at,
        r.updated_at,
        r.started_at,
        r.finished_at,
        r.next_at,
        r.last_error,
        r.worker,
        r.cancel_requested_at,
    )
