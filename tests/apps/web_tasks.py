"""The task app the web tests serve: ``kew serve tests/apps/web_tasks.py:app``.

The task store lives in ``$KEW_WEB_TEST_DIR`` (SQLite), and the queues too
unless ``$KEW_WEB_TEST_URL`` names another broker, so each test run has its
own.  ``slow`` tasks wait for a file ``release-<name>`` (or
``release-all``) in that directory: a test holds one running while it
follows its output.
"""

import os
import time
from pathlib import Path

import msgspec

from kew.task.app import App
from kew.task.context import current
from kew.task.errors import Permanent
from kew.task.retry import Intervals

DIR = Path(os.environ.get("KEW_WEB_TEST_DIR", "."))

URL = os.environ.get("KEW_WEB_TEST_URL") or f"sqlite:///{DIR / 'queues.sqlite3'}"

app = App(
    URL,
    name="webtest",
    store=f"sqlite:///{DIR / 'tasks.sqlite3'}",
)


class Thumbnail(msgspec.Struct, forbid_unknown_fields=True):
    """Render a thumbnail of an image."""

    image_id: int
    size: int = 128
    formats: list[str] = []
    note: str = ""


class Job(msgspec.Struct):
    name: str


@app.task("thumbs", retry=Intervals([0.2]), notify=True)
def thumbs(t: Thumbnail) -> None:
    ctx = current()
    ctx.log(f"rendering image {t.image_id} at {t.size}px\n")
    if t.note == "fail":
        raise Permanent("told to fail")
    ctx.log(f"image {t.image_id} done\n")


@app.task("slow")
def slow(job: Job) -> None:
    ctx = current()
    ctx.log(f"job {job.name} started\n")
    gate, every = DIR / f"release-{job.name}", DIR / "release-all"
    deadline = time.monotonic() + 120
    while not gate.exists() and not every.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx.log(f"job {job.name} released\n")


# An extra consumer on the outcomes (what a notifier would be): counts them.
OUTCOMES: list[str] = []
assert thumbs.outcomes is not None
app.consumer(thumbs.outcomes, lambda o: OUTCOMES.append(o.kind))
