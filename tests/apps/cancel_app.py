"""The app of the cancel tests run in other processes (``kew worker``, ``kew
serve``): tests/test_task_cancel.py and tests/test_web_cancel_page.py.

The queues are on ``$CANCEL_APP_URL`` (default: SQLite in
``$CANCEL_APP_DIR``), the task store is SQLite in ``$CANCEL_APP_DIR``; queue
names end with ``$CANCEL_APP_SUFFIX``.  ``loop`` runs until it is cancelled
(touching ``ran-<name>`` in the directory first); ``sleeper`` is a command
task running ``sleep 60``.
"""

import os
import time
from pathlib import Path

from kew.task import App, NoRetry, current

DIR = Path(os.environ.get("CANCEL_APP_DIR", "."))
SUFFIX = os.environ.get("CANCEL_APP_SUFFIX", "")

app = App(
    os.environ.get("CANCEL_APP_URL") or f"sqlite:///{DIR / 'queues.sqlite3'}",
    name="canceltest",
    store=f"sqlite:///{DIR / 'tasks.sqlite3'}",
    events_queue=f"cancel.events{SUFFIX}",
)


@app.task(f"cancel.loop{SUFFIX}", retry=NoRetry())
def loop(name: str) -> None:
    ctx = current()
    (DIR / f"ran-{name}").touch()
    ctx.log(f"{name}: started")
    deadline = time.monotonic() + 120
    while not ctx.cancelled.is_set() and time.monotonic() < deadline:
        ctx.log(f"{name}: tick")
        ctx.cancelled.wait(0.1)
    ctx.log(f"{name}: stopped")


def sleep_60(name: str) -> list[str]:
    return ["sh", "-c", f"echo {name}: sleeping as $$; exec sleep 60"]


sleeper = app.command_task(f"cancel.sleep{SUFFIX}", str, sleep_60, retry=NoRetry())


@app.task(f"cancel.quick{SUFFIX}", retry=NoRetry())
def quick(name: str) -> None:
    current().log(f"{name}: done")
