"""Concurrent ``await q.send(...)`` calls of one queue, sent together in
bounded chunks.

A call adds its value to the queue's pending list and awaits its own
future.  Once per turn of the event loop, the queue takes at most
:data:`CHUNK` pending values, builds their messages (the type check, the
encoding: what :meth:`kew.aio.Queue.message` does) and sends them with one
``send_many`` in a task of its own; the rest wait for the next turn.  So:

- coroutines sending at once share round trips (one batch per chunk, many
  chunks in flight), and each call still returns only once its own message
  is durable: when its chunk's ``send_many`` has returned;
- the loop does a bounded amount of kew's work per turn, whatever the
  number of senders: a burst of 1,000 coroutines costs each turn at most a
  chunk's encoding and a chunk's wake-ups, not 1,000 of each (the loop-lag
  target of docs/async.md);
- a value that is not of the queue's type, or too large, fails its own call
  only (``InvalidValue``, ``MessageTooLarge``); an error of a chunk's send
  reaches every call of that chunk, and only those (as a failed
  ``send_many``: those messages may or may not be stored).

A call cancelled before its chunk is built sends nothing; one cancelled
after may still be sent (as a cancelled ``send``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kew.qchan.spi import Message

#: At most this many messages are built per turn of the loop (one chunk, one
#: ``send_many``).  64 keeps a turn to a few milliseconds of encoding and
#: wake-ups (about 25 us a message) while a chunk still fills a round trip.
CHUNK = 64

_Pending = tuple[Any, "str | None", "asyncio.Future[str]"]


class ChunkedSends:
    """The pending sends of one queue (module docstring)."""

    def __init__(
        self,
        build: Callable[[Any, str | None], Message],
        send_many: Callable[[Sequence[Message]], Awaitable[None]],
    ) -> None:
        """``build(value, id)`` makes a value's message (raising for a bad
        one); ``send_many(messages)`` stores a chunk."""
        self._build = build
        self._send_many = send_many
        #: Per event loop (a queue may serve more than one): what waits for
        #: its next turn; a loop is here while a turn is scheduled on it
        #: (weakly, as in LoopGroupCommit: a loop closed before that turn ran
        #: is not kept alive by it).
        self._pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Pending]] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, value: Any, id: str | None = None) -> str:
        """Send ``value`` (message id ``id``, else a new one) with the others
        pending in this turn; its message id once stored."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:  # no turn scheduled on this loop yet
            pending = self._pending[loop] = []
            loop.call_soon(self._turn, loop)
        pending.append((value, id, future))
        return await future

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending[loop]
        chunk, rest = pending[:CHUNK], pending[CHUNK:]
        if rest:
            self._pending[loop] = rest
            loop.call_soon(self._turn, loop)
        else:
            del self._pending[loop]
        messages: list[Message] = []
        waiting: list[asyncio.Future[str]] = []
        for value, id, future in chunk:
            if future.done():  # its caller was cancelled: nothing sent
                continue
            try:
                messages.append(self._build(value, id))
            except Exception as e:  # that call's own error (InvalidValue, ...)
                future.set_exception(e)
                continue
            waiting.append(future)
        if messages:
            task = loop.create_task(self._send(messages, waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, messages: list[Message], waiting: list[asyncio.Future[str]]) -> None:
        try:
            await self._send_many(messages)
        except asyncio.CancelledError:  # the loop is closing: so are the calls
            for future in waiting:
                future.cancel()
            raise
        except BaseException as e:
            for future in waiting:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
        else:
            for future, message in zip(waiting, messages, strict=True):
                if not future.done():
                    future.set_result(message.id)
