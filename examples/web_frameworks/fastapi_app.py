"""A complete FastAPI service on kew: submit a task, read its status, stream
its output while it runs.

    pip install 'ome-kew[web]' fastapi
    uvicorn examples.web_frameworks.fastapi_app:app

    curl -X POST localhost:8000/thumbnails -d '{"image_id": 7}'
    curl -N localhost:8000/tasks/<id>/output

The lifespan starts a kew worker (and the status recorder) in this process
and stops it gracefully on shutdown; with workers on other hosts, leave the
worker out and keep ``async with tasks:``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from kew import DecodeError
from kew.task import TaskRecord

from .tasks import tasks, thumbnail


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with tasks, tasks.worker(concurrency=8, record=True):
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/thumbnails", status_code=202)
async def submit(request: Request) -> dict[str, str]:
    try:  # checked against the task's type: a bad body is a 422 that says why
        value = thumbnail.decode_json(await request.body())
    except DecodeError as e:
        raise HTTPException(422, str(e)) from None
    task_id = await thumbnail.submit_async(value)
    return {"id": task_id, "status": f"/tasks/{task_id}", "output": f"/tasks/{task_id}/output"}


async def _record(task_id: str) -> TaskRecord:
    record = await tasks.status_async(task_id)
    if record is None:
        raise HTTPException(404, f"no task {task_id!r}")
    return record


@app.get("/tasks/{task_id}")
async def status(task_id: str) -> dict[str, object]:
    r = await _record(task_id)
    return {"id": r.id, "status": r.status, "attempt": r.attempt, "error": r.last_error}


@app.get("/tasks/{task_id}/output")
async def output(task_id: str) -> StreamingResponse:
    await _record(task_id)
    return StreamingResponse(tasks.follow(task_id, timeout=300), media_type="text/plain")
