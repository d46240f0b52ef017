"""A complete Litestar service on kew: submit a task, read its status, stream
its output while it runs.

    pip install 'ome-kew[web]'
    uvicorn examples.web_frameworks.litestar_app:app

    curl -X POST localhost:8000/thumbnails -d '{"image_id": 7}'
    curl -N localhost:8000/tasks/<id>/output

Litestar decodes the body with msgspec into the task's own type (a bad body
is a 400 that says why). The lifespan starts a kew worker (and the status
recorder) in this process and stops it gracefully on shutdown; with workers
on other hosts, leave the worker out and keep ``async with tasks:``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from litestar import Litestar, get, post
from litestar.exceptions import NotFoundException
from litestar.params import Body, Parameter
from litestar.response import Stream

from kew.task import TaskRecord

from .tasks import Thumbnail, tasks, thumbnail


@asynccontextmanager
async def lifespan(_: Litestar) -> AsyncIterator[None]:
    async with tasks, tasks.worker(concurrency=8, record=True):
        yield


@post("/thumbnails", status_code=202)
async def submit(data: Annotated[Thumbnail, Body()]) -> dict[str, str]:
    task_id = await thumbnail.submit_async(data)
    return {"id": task_id, "status": f"/tasks/{task_id}", "output": f"/tasks/{task_id}/output"}


async def _record(task_id: str) -> TaskRecord:
    record = await tasks.status_async(task_id)
    if record is None:
        raise NotFoundException(f"no task {task_id!r}")
    return record


@get("/tasks/{task_id:str}")
async def status(task_id: Annotated[str, Parameter()]) -> dict[str, object]:
    r = await _record(task_id)
    return {"id": r.id, "status": r.status, "attempt": r.attempt, "error": r.last_error}


@get("/tasks/{task_id:str}/output")
async def output(task_id: Annotated[str, Parameter()]) -> Stream:
    await _record(task_id)
    return Stream(tasks.follow(task_id, timeout=300), media_type="text/plain")


app = Litestar([submit, status, output], lifespan=[lifespan])
