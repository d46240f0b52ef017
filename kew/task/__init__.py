"""kew.task: run / retry / notify on kew queues (see docs/tasks.md).

    from kew.task import App, Intervals, current

    app = App()                                   # $KEW_URL, else SQLite

    @app.task(retry=Intervals.minutes(10, 10, 120))
    def resize(job: Resize) -> None:
        current().log(f"resizing {job.path}")

    resize.submit(Resize(path="a.png"))           # -> task id

A task's handler runs on a worker (``kew worker MODULE:APP``, or ``app.worker()``); its
status and output travel as task events, which a recorder keeps in the app's task store
for anyone to read.
"""

from typing import TYPE_CHECKING, Any

from kew.task._cancel import CancelResult
from kew.task.app import DEFAULT_STORE, App, TaskQueue
from kew.task.command import CommandResult, CommandSpec, ExitAction, run_command
from kew.task.context import TaskContext, current
from kew.task.errors import Permanent, Retry, TimeLimitExceeded
from kew.task.model import (
    FINAL_STATUSES,
    STATUS_RANK,
    Outcome,
    TaskEvent,
    TaskRecord,
    TaskStatus,
    WorkerRecord,
)
from kew.task.retry import DEFAULT_RETRY, Exponential, Intervals, NoRetry, RetryPolicy
from kew.task.store import MemoryTaskStore, SqliteTaskStore, TaskStore, open_store

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_STORE",
    "FINAL_STATUSES",
    "STATUS_RANK",
    "App",
    "CancelResult",
    "CommandResult",
    "CommandSpec",
    "ExitAction",
    "Exponential",
    "Intervals",
    "MemoryTaskStore",
    "NoRetry",
    "Outcome",
    "Permanent",
    "Retry",
    "RetryPolicy",
    "SqliteTaskStore",
    "TaskContext",
    "TaskEvent",
    "TaskQueue",
    "TaskRecord",
    "TaskStatus",
    "TaskStore",
    "TimeLimitExceeded",
    "Worker",
    "WorkerRecord",
    "current",
    "open_store",
    "run_command",
]

if TYPE_CHECKING:
    from kew.task.worker import Worker


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``python -m kew.task.worker`` does not
    # find the module imported already by its package.
    if name == "Worker":
        from kew.task.worker import Worker

        return Worker
    raise AttributeError(f"module 'kew.task' has no attribute {name!r}")
