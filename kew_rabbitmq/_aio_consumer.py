"""The consumer of the RabbitMQ provider's native async route
(``RabbitAsyncConnector.consumer``): the sync
:class:`~kew_rabbitmq._consumer.RabbitConsumer` itself, whose I/O thread
tells the event loop what happens, awaited.

Everything the sync consumer does is done the same way, by the same code:
its I/O thread connects, subscribes (``basic.qos(prefetch)`` then
``basic.consume``: the broker pushes at most ``prefetch`` unsettled),
receives into its buffer, dead-letters at once a message whose envelope
kew cannot read, writes acks and requeues, publishes dead letters on its
confirm channel and acks them on their confirms, keeps heartbeats going,
and reconnects with back-off (what a lost connection held is requeued by
the broker).  What is this module's:

* **The loop is woken, not polled**, and **a cancelled fetch keeps
  nothing** (what arrives stays buffered for the next fetch, or is requeued
  by the broker when the consumer closes): the push consumers' fetch of
  :mod:`kew.qchan.spi._aio_push`, the I/O thread waking it.  Taking from
  the buffer never blocks (a lock held for microseconds).
* **Acks and requeues** are queued for the I/O thread and not waited for,
  as in the sync consumer (the broker requeues what a lost connection
  held); a **dead letter** is awaited until its confirm (then the ack is
  written), as the sync one waits.
* **Start and close are awaited** (:mod:`kew.qchan.spi._aio_push`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from kew.qchan.spi import BrokerUnavailable, Delivery
from kew.qchan.spi._aio_push import LoopWaker, PushConsumer, set_done, subscribed
from kew_rabbitmq._connection import nothing
from kew_rabbitmq._consumer import RabbitConsumer

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

__all__ = ["RabbitAsyncConsumer"]


def _settled(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its coroutine was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Core(LoopWaker, RabbitConsumer):
    """The sync consumer whose I/O thread tells ``loop`` when it subscribed
    (or failed), when a delivery arrives for a waiting fetch, and when it
    ends.  Its constructor does not wait for the subscription."""

    def __init__(
        self,
        connector: RabbitConnector,
        queue: str,
        prefetch: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # (set before the I/O thread starts, in the base constructor)
        self._wake_to(loop)
        self._window_moved = asyncio.Event()  # a window applied, or given up on
        super().__init__(connector, queue, prefetch)

    # -- on the I/O thread (the base class's, with a word to the loop) --------

    def _run_io(self) -> None:
        try:
            super()._run_io()
        finally:
            self._to_loop(set_done, self._down)

    def _subscribe(self) -> Any:
        conn = super()._subscribe()
        self._to_loop(set_done, self._up)
        return conn

    def _fail(self, why: str, cause: BaseException | None, log_it: bool = True) -> None:
        super()._fail(why, cause, log_it)
        self._to_loop(set_done, self._up)
        self._wake_failed()
        self._to_loop(self._window_moved.set)  # a set_prefetch waiting returns

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        super()._on_message(ch, method, props, body)
        self._wake()

    def _resized(self, asked: int) -> None:
        super()._resized(asked)
        self._to_loop(self._window_moved.set)

    def _lose(self, why: str) -> None:
        super()._lose(why)
        self._to_loop(self._window_moved.set)  # a set_prefetch waiting gives up

    # -- on the loop ------------------------------------------------------------

    def stop(self) -> None:
        """What the sync ``close`` does before it waits for the I/O thread:
        the thread closes the connection (the broker requeues what it held)."""
        self._closed.set()
        self._armed = False
        self._window_moved.set()  # (on the loop) a set_prefetch waiting returns
        with self._window:  # a set_prefetch waiting returns
            self._window.notify_all()
        if self._pid == os.getpid():
            conn = self._conn
            if conn is not None and conn.is_open:
                with contextlib.suppress(Exception):
                    conn.add_callback_threadsafe(nothing)  # the I/O loop sees _closed now


class RabbitAsyncConsumer(PushConsumer[_Core]):
    """An :class:`~kew.qchan.spi.aio.AsyncConsumer` on the sync consumer's
    I/O thread (the module's docstring)."""

    @classmethod
    async def start(
        cls, connector: RabbitConnector, queue: str, prefetch: int
    ) -> RabbitAsyncConsumer:
        """A consumer subscribed to ``queue``; raises as the sync constructor
        does (``AccessRefused``, ``BrokerUnavailable``, ``ConsumerFailed``)."""
        core = _Core(connector, queue, prefetch, asyncio.get_running_loop())
        await subscribed(core)
        return cls(core)

    async def set_prefetch(self, count: int) -> None:
        """The sync ``set_prefetch`` (the I/O thread consumes again with
        ``count``), awaited on the loop: no thread waits for the round trips."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"prefetch must be an int >= 1, not {count!r}")
        core = self._core
        with core._window:
            core._prefetch = count
            core._asked += 1
            asked, losses = core._asked, core._losses
        conn = core._conn
        if conn is None or not conn.is_open or core._pid != os.getpid():
            return  # lost: the next connection consumes with it
        try:
            conn.add_callback_threadsafe(nothing)  # the I/O loop sees it now
        except Exception:
            return  # lost: the next connection consumes with it

        def moved() -> bool:
            with core._window:
                return (
                    core._applied - asked >= 0
                    or core._losses != losses
                    or core._closed.is_set()
                    or core._failure is not None
                )

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(core.COMMIT_TIMEOUT):
                while True:
                    core._window_moved.clear()  # a change from now on sets it
                    if moved():
                        return
                    await core._window_moved.wait()

    def _take(self, most: int) -> list[Delivery]:
        """What the buffer holds of the current connection, up to ``most``."""
        core = self._core
        for _ in range(3):  # a wake-up meant for a sync fetch ends a take early
            got = core._buffer.take(most, 0, lambda: core._generation)
            if got:
                return got
        return []

    async def ack(self, delivery: Delivery) -> None:
        self._core.ack(delivery)  # queued for the I/O thread, not waited for

    async def release(self, delivery: Delivery) -> None:
        self._core.release(delivery)  # queued for the I/O thread, not waited for

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Published to ``<q>.dead`` and acked once confirmed (a lost
        connection: not acked, delivered again, as the sync one)."""
        core = self._core
        loop = asyncio.get_running_loop()
        done_: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:  # on the I/O thread, or here
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settled, done_, error)

        sends = [core._dead_send(delivery, reason)]
        core._send_then_ack([delivery], sends, done, held_only=True)
        with contextlib.suppress(BrokerUnavailable, TimeoutError):  # delivered again
            async with asyncio.timeout(core.COMMIT_TIMEOUT):
                await done_

    async def close(self) -> None:
        """Stop; the broker requeues every unsettled delivery when the I/O
        thread closes the connection (after writing the acks queued)."""
        if self._closed:
            return
        self._closed = True
        await self._stop_core()
        self._core._buffer.drop()
