"""Async task handlers: ``@app.task`` on an ``async def``.

The attempt's state machine (:mod:`kew.task._attempt`) is the same for
both kinds of handler; only the call differs.  An async handler's coroutine
runs on the worker's event loop, one loop per :class:`~kew.task.App` on a
daemon thread of its own (started with the first async attempt), so that
the async handlers of every queue of the app share it and may share what
lives on it (a client session, a connection pool made on first use).

The route of an async attempt (:class:`Lane`, one per subscription of an
async task queue):

* the subscription's fetch thread (an async queue has no handler threads:
  ``Subscription(inline=True)``) does what comes before the handler, as for
  a sync one (admit and decode, the cancel check, the ``running`` status),
  then hands the attempt to the loop without waiting for it: it goes into a
  queue, and the loop is woken (``call_soon_threadsafe``) only if no
  wake-up is on its way already, so a fetched batch costs one.  The
  delivery stays held (``Subscription.hand_over``: counted as running,
  against the window, waited for by a graceful stop), and the thread goes
  on with the next delivery at once;
* on the loop, at most ``concurrency`` coroutines of the queue run at once
  (the others wait their turn in the order they came), each in a copy of
  the loop's context with :func:`~kew.task.current` set;
* a coroutine's end goes into the lane's list of ended attempts, which one
  thread of the lane (the finisher, woken only if it sleeps) takes in
  batches: it settles them as for a sync handler (retries, status events,
  output, outcomes, the exceeded handler, dead letters), those of one batch
  in one group commit with their acks.  The loop never waits on a broker.
  The adaptive window counts the coroutine's time as the handler's.

It is cancelled (``task.cancel()``, so ``CancelledError`` is raised at its
``await``) when

* its time limit passes (``time_limit=`` on ``@app.task``; a timer on the
  loop): the attempt fails with :class:`~kew.task.TimeLimitExceeded` and
  the retry policy decides what comes next, whatever the coroutine did with
  the cancel;
* the task is cancelled on request (``App.cancel``; setting
  ``ctx.cancelled`` schedules the cancel on the loop at once): the attempt
  ends ``cancelled``;
* the worker stops and hands the attempt back (a graceful shutdown whose
  grace period ran out): the task is delivered again.

An attempt cancelled before its turn came is not started.  A coroutine that
swallows ``CancelledError`` and goes on is given :data:`CANCEL_GRACE`
seconds to end; then the attempt is over for kew (for a time limit: failed
with a ``TimeLimitExceeded`` that says the handler did not stop; its slot
is free again) and the coroutine is left running on the loop, logged at
ERROR.

:func:`run_coroutine` runs a coroutine and waits for it from a thread (an
async exceeded handler, which runs on the finisher).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kew.task.context import TaskContext, reset_current, set_current
from kew.task.errors import TimeLimitExceeded

__all__ = [
    "CANCEL_GRACE",
    "EventLoopThread",
    "Job",
    "Lane",
    "is_async_handler",
    "run_coroutine",
    "run_local",
]

T = TypeVar("T")
log = logging.getLogger("kew.task")

#: Seconds a cancelled coroutine is given to end before kew stops waiting.
CANCEL_GRACE = 10.0
#: How often a waiting handler thread looks at ``ctx.cancelled`` (seconds).
_LOOK = 0.1
#: Seconds an idle finisher thread waits for work before it ends.
_IDLE = 5.0


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
        # hand-overs to start on the loop, and whether a drain is on its way
        self._inbox: list[Job] = []
        self._draining = False
        self.lanes: weakref.WeakSet[Lane] = weakref.WeakSet()

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

    def hand_over(self, job: Job) -> None:
        """Start ``job`` on the loop (from any thread; returns at once).  The
        loop is woken once for all the jobs handed over until it drains
        them."""
        loop = self._loop or self.loop
        with self._lock:
            self._inbox.append(job)
            if self._draining:
                return
            self._draining = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (the app closing)
            with self._lock:
                self._draining = False
                jobs, self._inbox = self._inbox, []
            for j in jobs:
                j.lane.ended(j, _closed())

    def _drain(self) -> None:
        with self._lock:
            jobs, self._inbox = self._inbox, []
            self._draining = False
        for job in jobs:
            job.lane.admit(job)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, then stop it (a no-op if it
        never started)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def shut() -> None:
            for lane in list(self.lanes):
                lane.abandon()
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
        with self._lock:  # handed over too late for the loop: never started
            late, self._inbox = self._inbox, []
            self._draining = False
        for job in late:
            job.lane.ended(job, _closed())


class Job:
    """One async attempt handed to a :class:`Lane`: ``fn(data)`` with
    ``ctx`` current.  Once it ended, ``error`` is what it ended with (None:
    it returned, or was cancelled on request or handed back, the caller
    reads ``ctx``), ``ran`` how long it ran, ``ended`` when
    (``time.monotonic()``).  ``owner`` is the caller's."""

    __slots__ = (
        "began",
        "ctx",
        "data",
        "ended",
        "error",
        "fn",
        "give_up",
        "lane",
        "over",
        "owner",
        "ran",
        "task",
        "timer",
        "why",
    )

    def __init__(
        self,
        lane: Lane,
        fn: Callable[[Any], Awaitable[object]],
        data: object,
        ctx: TaskContext,
        owner: object,
    ) -> None:
        self.lane = lane
        self.fn = fn
        self.data = data
        self.ctx = ctx
        self.owner = owner
        self.task: asyncio.Task[object] | None = None
        self.why: str | None = None  # "time" or "cancel", once cancelled
        self.timer: asyncio.TimerHandle | None = None
        self.give_up: asyncio.TimerHandle | None = None
        self.over = False
        self.error: BaseException | None = None
        self.began = self.ended = self.ran = 0.0


class Lane:
    """The async attempts of one subscription: at most ``concurrency``
    coroutines at once on ``loops``' loop, their ends handed to ``finish``
    (a list at a time, in arrival order) on a finisher thread of the lane
    (module docstring).  ``time_limit``: seconds, or None."""

    def __init__(
        self,
        loops: EventLoopThread,
        concurrency: int,
        name: str,
        finish: Callable[[list[Job]], None],
        time_limit: float | None = None,
    ) -> None:
        self.loops = loops
        self.concurrency = concurrency
        self.name = name
        self.time_limit = time_limit
        self._finish = finish
        # on the loop's thread only
        self._active = 0
        self._waiting: deque[Job] = deque()
        # ended jobs, for the finisher
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ended: list[Job] = []
        self._awake = False
        self._finisher: threading.Thread | None = None
        loops.lanes.add(self)

    # -- any thread ---------------------------------------------------------

    def hand_over(
        self, fn: Callable[[Any], Awaitable[object]], data: object, ctx: TaskContext, owner: object
    ) -> Job:
        """Run ``fn(data)`` with ``ctx`` current on the loop, in its turn;
        returns at once (the job is finished on the lane's finisher)."""
        job = Job(self, fn, data, ctx, owner)
        self.loops.hand_over(job)
        ctx.on_cancel(lambda: self._cancel_soon(job))
        return job

    def _cancel_soon(self, job: Job) -> None:
        """``job.ctx.cancelled`` was set (on request, or a hand-back)."""
        loop = self.loops._loop
        if loop is None or job.over:
            return
        with contextlib.suppress(RuntimeError):  # closed: what ran on it was cancelled
            loop.call_soon_threadsafe(self._cancel, job)

    # -- on the loop ----------------------------------------------------------

    def admit(self, job: Job) -> None:
        """A job handed over: start it if the lane has room, else it waits."""
        if job.why is not None:
            return  # cancelled before it came (and ended so)
        if job.ctx.handed_back or job.ctx.cancelled.is_set():
            self._waiting.append(job)  # its cancel, on its way, ends it unstarted
            return
        if self._active < self.concurrency:
            self._start(job)
        else:
            self._waiting.append(job)

    def _start(self, job: Job) -> None:
        self._active += 1
        job.began = time.monotonic()
        try:
            coro = job.fn(job.data)
        except Exception as e:  # (an async def raises nothing on its call; a callable may)
            self.ended(job, e)
            return
        if not asyncio.iscoroutine(coro):
            coro = _awaited(coro)
        context = contextvars.copy_context()
        context.run(set_current, job.ctx)
        loop = asyncio.get_running_loop()
        task = loop.create_task(coro, context=context)
        job.task = task
        task.add_done_callback(lambda t: self._done(job, t))
        if self.time_limit is not None:
            job.timer = loop.call_later(self.time_limit, self._time_up, job)

    def abandon(self) -> None:
        """The loop is closing: the jobs waiting their turn never start."""
        while self._waiting:
            self.ended(self._waiting.popleft(), _closed())

    def _cancel(self, job: Job) -> None:
        if job.over or job.why is not None:
            return
        job.why = "cancel"
        if job.task is None:  # still waiting its turn: never starts
            with contextlib.suppress(ValueError):
                self._waiting.remove(job)
            self.ended(job, None)
            return
        self._stop(job)

    def _time_up(self, job: Job) -> None:
        if job.over or job.why is not None:
            return
        job.why = "time"
        self._stop(job)

    def _stop(self, job: Job) -> None:
        assert job.task is not None
        job.task.cancel()
        grace = CANCEL_GRACE  # (read now: tests change it)
        job.give_up = asyncio.get_running_loop().call_later(grace, self._gave_up, job, grace)

    def _gave_up(self, job: Job, grace: float) -> None:
        """The coroutine did not end within ``grace`` of its cancel: the
        attempt is over for kew, the coroutine left running."""
        if job.over:
            return
        ctx = job.ctx
        log.error(
            "kew: %s: task %s did not stop within %.0f s of its cancel; "
            "left running on the event loop",
            ctx.queue,
            ctx.id,
            grace,
        )
        ctx.log(f"[kew] the handler did not stop within {grace:.0f} s of its cancel")
        error = None
        if job.why == "time":
            error = TimeLimitExceeded(
                f"time limit of {self.time_limit:g} s exceeded, and the handler did not stop "
                f"within {grace:g} s of its cancel"
            )
        self.ended(job, error)

    def _done(self, job: Job, task: asyncio.Task[object]) -> None:
        if job.over:
            return  # given up on already
        error: BaseException | None
        if job.why == "time":
            # Whatever the coroutine did with the cancel (ended, raised, or
            # swallowed it and returned): the attempt took too long.
            error = TimeLimitExceeded(f"time limit of {self.time_limit:g} s exceeded")
        elif task.cancelled():
            error = None
            if job.why is None:  # cancelled by someone else (the loop shutting down)
                error = TimeLimitExceeded("the worker's event loop cancelled the handler")
        else:
            error = task.exception()
        self.ended(job, error)

    def ended(self, job: Job, error: BaseException | None) -> None:
        """``job`` is over (on the loop, or where it could not start): free
        its slot, start the next, and hand it to the finisher."""
        job.over = True
        job.error = error
        job.ended = time.monotonic()
        if job.began:
            job.ran = job.ended - job.began
            self._active -= 1
            while self._waiting and self._active < self.concurrency:
                nxt = self._waiting.popleft()
                if nxt.why is None and not nxt.ctx.handed_back and not nxt.ctx.cancelled.is_set():
                    self._start(nxt)
                # (else its cancel, on its way to the loop, ends it unstarted)
        for timer in (job.timer, job.give_up):
            if timer is not None:
                timer.cancel()
        with self._lock:
            self._ended.append(job)
            if self._awake:
                return
            self._awake = True
            if self._finisher is not None:
                self._wake.notify()
                return
            self._finisher = threading.Thread(
                target=self._finish_loop, name=f"kew-finish-{self.name}", daemon=True
            )
            self._finisher.start()

    # -- the finisher ---------------------------------------------------------

    def _finish_loop(self) -> None:
        while True:
            with self._lock:
                while not self._ended:
                    self._awake = False
                    if not self._wake.wait(_IDLE) and not self._ended:
                        self._finisher = None  # (started again with the next end)
                        return
                jobs, self._ended = self._ended, []
            try:
                self._finish(jobs)
            except Exception:
                log.exception("kew: %s: finishing %d async attempts failed", self.name, len(jobs))


def _closed() -> TimeLimitExceeded:
    return TimeLimitExceeded("the worker's event loop closed before the handler ran")


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable


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
