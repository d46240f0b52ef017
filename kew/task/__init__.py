"""kew.task: run / retry / notify on kew queues (see docs/tasks.md)."""

from kew.task.model import Outcome, TaskEvent, TaskRecord, TaskStatus, WorkerRecord

__all__ = ["Outcome", "TaskEvent", "TaskRecord", "TaskStatus", "WorkerRecord"]
