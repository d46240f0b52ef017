"""The kew side of both framework examples: one task app with an async task.

Run a worker for it elsewhere with ``kew worker examples.web_frameworks.tasks:tasks``,
or in the web service's own process through its lifespan (both examples do).
"""

from __future__ import annotations

import asyncio
import os

import msgspec

from kew.task import App, Intervals, current

# $KEW_URL picks the broker (default: the embedded SQLite file kew.sqlite3);
# $KEW_STORE the task store (default: kew-tasks.sqlite3).
tasks = App(store=os.environ.get("KEW_STORE"))


class Thumbnail(msgspec.Struct, frozen=True):
    image_id: int
    size: int = 256


@tasks.task("thumbnails", retry=Intervals([1, 5, 30]), time_limit=60)
async def thumbnail(t: Thumbnail) -> None:
    """An async task: it runs on the worker's event loop; its output is
    recorded as it goes and streamed by the web service."""
    ctx = current()
    for step in ("fetching", "rendering", "storing"):
        ctx.log(f"image {t.image_id}: {step} at {t.size}px")
        await asyncio.sleep(0.05)  # the real work awaits OMERO, a renderer, S3...
    ctx.log(f"image {t.image_id}: done")
