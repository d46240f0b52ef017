"""``POST /tasks/{id}/cancel`` on the async API: a task running in a ``kew
worker`` process is cancelled through kew.web's REST endpoint, served by
uvicorn on this test's loop (SQLite, a native async route).  The cancel
(``App.cancel_async``) reads and marks the store on kew.web's store thread
(two calls: the record; the mark and the workers) and sends the event and the
worker's cancel message on the web's async connector: no job for the loop's
executor, no new thread.  The task stops and ends ``cancelled``, its output
kept; asking again answers ``cancelled`` already; an unknown task is 404.

``App.cancel_async`` on its own (its defaults: a thread for the store, the
app's async connector) answers as ``App.cancel`` does."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kew.qchan.spi import now_ms
from kew.task import App, NoRetry, TaskEvent
from kew.task._cancel import CancelResult
from kew.web import Token, WebConfig, create_app
from kew.web._state import web_state
from tests.test_web_async import ADMIN, CountingExecutor, uvicorn_here

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
APP = "tests/apps/cancel_app.py:app"
#: Seconds a running task may take to stop once cancelled.
STOPS_WITHIN = 5.0


async def _until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    """``await check()`` until it is truthy (its value), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _app(directory: Path, sfx: str) -> App:
    """tests/apps/cancel_app.py's app as the worker process has it (its
    handler never runs here: no worker in this process)."""
    app = App(
        f"sqlite:///{directory / 'queues.sqlite3'}",
        name="canceltest",
        store=f"sqlite:///{directory / 'tasks.sqlite3'}",
        events_queue=f"cancel.events{sfx}",
    )
    app.task_queue(f"cancel.loop{sfx}", str, lambda name: None, retry=NoRetry())
    app.task_queue(f"cancel.quick{sfx}", str, lambda name: None, retry=NoRetry())
    return app


def _worker(directory: Path, sfx: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEW_", "CANCEL_APP_"))}
    env.update({"PYTHONPATH": str(ROOT), "CANCEL_APP_DIR": str(directory)})
    env["CANCEL_APP_SUFFIX"] = sfx
    cmd = [sys.executable, "-m", "kew.cli", "worker", APP, "--record", "--concurrency", "2"]
    with (directory / "worker.log").open("wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)


def test_a_task_in_a_worker_process_is_cancelled_through_the_rest_endpoint(
    tmp_path: Path,
) -> None:
    sfx = f"-{secrets.token_hex(4)}"
    worker = _worker(tmp_path, sfx)
    try:
        with _app(tmp_path, sfx) as app:
            asgi = create_app(app, WebConfig(tokens=[Token.plain("admin", ADMIN)]))
            asyncio.run(_cancel_over_http(asgi, sfx))
        assert worker.poll() is None  # the worker goes on
    finally:
        worker.terminate()
        worker.wait(30)


async def _cancel_over_http(asgi: Any, sfx: str) -> None:
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    web = web_state(asgi.state).backend
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with uvicorn_here(asgi) as base:
        # (in-process, without a socket: a TCP client would resolve the
        # address in the loop's executor)
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url=base, headers=headers) as c:

            async def heartbeat() -> bool:
                return bool((await c.get("/health")).json()["workers"])

            await _until("the worker's heartbeat", heartbeat)
            r = await c.post(f"/queues/cancel.loop{sfx}/tasks", json="web")
            assert r.status_code == 202, r.text
            tid = r.json()["id"]

            async def ticking() -> bool:
                out = await c.get(f"/tasks/{tid}/output", params={"follow": "false"})
                return "web: tick" in out.text

            await _until("the task running in the worker process", ticking)
            # Warm: the browser and control queue paths are made on first use.
            assert (await c.post("/tasks/nosuchtask/cancel")).status_code == 404

            threads = {t.ident for t in threading.enumerate()}
            jobs, store_calls = executor.jobs, web.store.calls
            asked = time.monotonic()
            r = await c.post(f"/tasks/{tid}/cancel")
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["id"], doc["cancelled"], doc["status"]) == (tid, True, "running")
            assert doc["workers"] == 1
            # The store on its thread (the record; the mark and the workers),
            # the broker awaited: no job for the executor, no new thread.
            assert web.store.calls == store_calls + 2
            assert executor.jobs == jobs
            new = [t.name for t in threading.enumerate() if t.ident not in threads]
            assert new == [], new

            async def cancelled() -> dict[str, Any] | None:
                rec: dict[str, Any] = (await c.get(f"/tasks/{tid}")).json()
                return rec if rec["status"] == "cancelled" else None

            rec = await _until("the task cancelled", cancelled, STOPS_WITHIN + 10)
            assert time.monotonic() - asked < STOPS_WITHIN + 3
            assert rec["cancel_requested_at"] >= rec["created_at"]
            out = (await c.get(f"/tasks/{tid}/output", params={"follow": "false"})).text
            assert "web: started\n" in out and "web: stopped\n" in out
            assert "[kew] attempt 1 cancelled on request" in out

            again = (await c.post(f"/tasks/{tid}/cancel")).json()
            assert (again["cancelled"], again["status"]) == (True, "cancelled")
            assert again["detail"] == f"task {tid} is cancelled already"
    executor.shutdown()


def test_cancel_async_answers_as_cancel(tmp_path: Path) -> None:
    """``App.cancel_async`` with its defaults, in a process of its own: a
    queued task is marked (the store and the events queue), then a second
    ask is 'asked again', like ``App.cancel``; an unknown task is KeyError."""
    sfx = f"-{secrets.token_hex(4)}"
    with _app(tmp_path, sfx) as app:
        tq = app.queues[f"cancel.loop{sfx}"]

        async def run() -> tuple[str, CancelResult, CancelResult]:
            tid = await tq.submit_async("queued")
            # (no recorder here: the queued event recorded by hand, as kew.web does)
            app.store.apply([TaskEvent(tid, tq.name, "queued", now_ms())])
            first = await app.cancel_async(tid, by="tester")
            second = await app.cancel_async(tid)
            with pytest.raises(KeyError):
                await app.cancel_async("nosuchtask")
            return tid, first, second

        tid, first, second = asyncio.run(run())
        assert (first.cancelled, first.status, first.workers) == (True, "queued", 0)
        assert "asked: it ends cancelled when a worker takes it" in first.detail
        assert "asked again" in second.detail
        rec = app.store.get(tid)
        assert rec is not None and rec.cancel_requested_at is not None
        # the event went to the events queue too, for the recorders
        peeked = app.events.browser().peek(100)
        kinds = [e.kind for m in peeked for e in (m if isinstance(m, list) else [m])]
        assert kinds.count("cancel-requested") == 2
        sync = app.cancel(tid)
        assert (sync.cancelled, sync.status) == (second.cancelled, second.status)
