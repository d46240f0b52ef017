"""Async task handlers: ``@app.task`` on an ``async def``.

The attempt's state machine (:mod:`kew.task._attempt`) is the same for
both kinds of handler; only the call differs.  An async handler's coroutine
runs on the worker's event loop, one loop per :class:`~kew.task.App` on a
daemon thread of its own (started with the first async attempt), so that
the async handlers of every queue of the app share it and may share what
lives on it (a client session, a connection pool made on first use).  The
handler thread that took the delivery waits for the coroutine's end and
then settles the attempt as for a sync handler: retries, status events,
output, outcomes and the ack after the handler are the same code.  Each
running async attempt holds one of its queue's ``concurrency`` slots; a
slot is a thread that waits and does nothing else.

The coroutine runs in a copy of the handler thread's context, so
:func:`~kew.task.current` works inside it (and in what it awaits).

It is cancelled (``task.cancel()``, so ``CancelledError`` is raised at its
``await``) when

* its time limit passes (``time_limit=`` on ``@app.task``): the attempt
  fails with :class:`~kew.task.TimeLimitExceeded` and the retry policy
  decides what comes next, whatever the coroutine did with the cancel;
* the task is cancelled on request (``App.cancel``): the attempt ends
  ``cancelled``;
* the worker stops and hands the attempt back (a graceful shutdown whose
  grace period ran out): the task is delivered again.

A coroutine that swallows ``CancelledError`` and goes on is given
:data:`CANCEL_GRACE` seconds to end; then the attempt is over for kew (for
a time limit: failed with a ``TimeLimitExceeded`` that says the handler did
not stop) and the coroutine is left running on the loop, logged at ERROR.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kew.task.context import TaskContext, reset_current, set_current
from kew.task.errors import TimeLimitExceeded

__all__ = ["CANCEL_GRACE", "EventLoopThread", "is_async_handler", "run_coroutine", "run_local"]

T = TypeVar("T")
log = logging.getLogger("kew.task")

#: Seconds a cancelled coroutine is given to end before kew stops waiting.
CANCEL_GRACE = 10.0
#: How often a waiting handler thread looks at ``ctx.cancelled`` (seconds).
_LOOK = 0.1


def is_async_handler(fn: object) -> bool:
    """Is ``fn`` an ``async def`` (or an object whose ``__call__`` is one)?"""
    call = getattr(fn, "__call__", None)  # noqa: B004 - the attribute, not callable()
    return asyncio.iscoroutinefunction(fn) or asyncio.iscoroutinefunction(call)


class EventLoopThread:
    """One event loop on a daemon thread, started at first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, then stop it (a no-op if it
        never started)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def shut() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shut()))
        thread.join(timeout + 1.0)
        if not thread.is_alive():
            loop.close()


def run_coroutine(
    loops: EventLoopThread,
    fn: Callable[[T], Awaitable[object]],
    data: T,
    ctx: TaskContext,
    time_limit: float | None,
    *,
    cancel_grace: float | None = None,
) -> None:
    """Run ``fn(data)`` on the loop and wait for it, from a handler thread
    whose context has ``ctx`` current.  Returns when it returned (or was
    cancelled on request or by a hand-back: the caller reads ``ctx``);
    raises what it raised, or :class:`TimeLimitExceeded`."""
    if cancel_grace is None:
        cancel_grace = CANCEL_GRACE
    loop = loops.loop
    context = contextvars.copy_context()
    ended = threading.Event()
    box: list[asyncio.Task[object]] = []

    async def call() -> object:
        return await fn(data)

    def start() -> None:
        task = loop.create_task(call(), context=context)
        task.add_done_callback(lambda _: ended.set())
        box.append(task)

    def cancel() -> None:
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in box])

    loop.call_soon_threadsafe(start)
    started = time.monotonic()
    deadline = None if time_limit is None else started + time_limit
    why: str | None = None  # "time" or "cancel", once cancelled
    given_up_at: float | None = None
    while not ended.is_set():
        now = time.monotonic()
        if why is None:
            if deadline is not None and now >= deadline:
                why = "time"
            elif ctx.cancelled.is_set():
                why = "cancel"
            if why is not None:
                cancel()
                given_up_at = now + cancel_grace
        elif given_up_at is not None and now >= given_up_at:
            log.error(
                "kew: %s: task %s did not stop within %.0f s of its cancel; "
                "left running on the event loop",
                ctx.queue,
                ctx.id,
                cancel_grace,
            )
            ctx.log(f"[kew] the handler did not stop within {cancel_grace:.0f} s of its cancel")
            if why == "time":
                raise TimeLimitExceeded(
                    f"time limit of {time_limit:g} s exceeded, and the handler did not stop "
                    f"within {cancel_grace:g} s of its cancel"
                )
            return
        wait = _LOOK if deadline is None or why is not None else min(_LOOK, deadline - now)
        ended.wait(max(wait, 0.0))
    task = box[0]
    if why == "time":
        # Whatever the coroutine did with the cancel (ended, raised, or
        # swallowed it and returned): the attempt took too long.
        raise TimeLimitExceeded(f"time limit of {time_limit:g} s exceeded")
    if task.cancelled():
        if why is None:  # cancelled by someone else (the loop shutting down)
            raise TimeLimitExceeded("the worker's event loop cancelled the handler")
        return
    error = task.exception()
    if error is not None:
        raise error


def run_local(fn: Callable[[Any], Awaitable[object]], data: Any, ctx: TaskContext) -> Any:
    """For ``TaskQueue.__call__`` on an async handler: a coroutine that runs
    ``fn(data)`` with ``ctx`` current (await it)."""

    async def local() -> object:
        token = set_current(ctx)
        try:
            return await fn(data)
        finally:
            reset_current(token)
            ctx.flush()

    return local()
