"""The consumer of the STOMP provider's native async route
(``StompAsyncConnector.consumer``): the sync
:class:`~kew_artemis.provider.StompConsumer` itself, whose threads tell the
event loop what happens, awaited.

Its connection thread connects, subscribes (``client-individual`` acks,
the dialect's prefetch header), waits for a loss and reconnects with
back-off, as in the sync route; stomp.py's receiver thread reads every
MESSAGE frame into its buffer (one kew cannot read is dead-lettered at
once by ``fetch``).  What is this module's:

* **The loop is woken, not polled**, and **a cancelled fetch keeps
  nothing**: the push consumers' fetch of :mod:`kew.qchan.spi._aio_push`,
  the receiver thread waking it.  Taking from the buffer never blocks.
* **Settling writes, never waits on a thread**: ACK frames, and the
  receipted copies of dead letters and releases, are queued for a writer
  thread of the consumer's (:class:`~kew_artemis._aio_link.Pipe`), which
  writes what is queued in one socket write.  ``ack`` returns once its ACK
  is queued and the writer resolves its future once written: ACKs carry
  no receipt, as in the sync route (a receipt per ACK halves ActiveMQ's
  consume rate: raw stomp.py, prefetch 8, 2,000 against 4,000 msg/s), and
  ``close`` waits for every ACK queued to be written, then ends the
  connection with a receipted DISCONNECT (the broker has processed every
  frame before it).  A dead letter or release awaits its copy's receipt
  (with ``batch=tx``, ActiveMQ's default, in the writer's next
  transaction: one journal sync for what was queued meanwhile), then its
  ACK's writing.
* **Start and close are awaited** (:mod:`kew.qchan.spi._aio_push`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from kew.qchan.spi import Delivery, Message, now_ms
from kew.qchan.spi._aio_push import LoopWaker, PushConsumer, set_done, subscribed
from kew.qchan.spi.wire import H_DEAD_AT, H_DEAD_COUNT, H_DEAD_REASON
from kew_artemis._aio_link import AioLink, Pipe
from kew_artemis._frames import H_REDELIVERIES, delivery_count, send_headers
from kew_artemis._link import _Link, _Lost
from kew_artemis.provider import StompConsumer, _Tag

if TYPE_CHECKING:
    from kew_artemis.provider import StompConnector

__all__ = ["StompAsyncConsumer"]

log = logging.getLogger("kew.stomp")


class _Core(LoopWaker, StompConsumer):
    """The sync consumer, telling ``loop`` when it subscribed (or failed),
    when a delivery arrives for a waiting fetch, and when its connection
    thread ends.  Its constructor does not wait for the subscription."""

    def __init__(
        self, connector: StompConnector, queue: str, prefetch: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        # (set before the connection thread starts, in the base constructor)
        self._wake_to(loop)
        o = connector.options
        self.pipe = Pipe(o, connector.url, f"kew-stomp-aio-{queue}", current=self._live)
        super().__init__(connector, queue, prefetch)

    def _live(self) -> AioLink | None:
        link = self._link
        return link if isinstance(link, AioLink) else None

    # -- on the consumer's threads ---------------------------------------------

    def _new_link(self) -> _Link:
        return AioLink(self._c.options, self._c.url, self._on_message)

    def _set_ready(self) -> None:
        super()._set_ready()
        self._to_loop(set_done, self._up)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self._to_loop(set_done, self._down)

    def _fail(self, why: str, cause: BaseException | None = None) -> None:
        super()._fail(why, cause)
        self._wake_failed()

    def _on_message(self, link: _Link, headers: dict[str, str], body: bytes) -> None:
        super()._on_message(link, headers, body)
        self._wake()

    # -- on the loop --------------------------------------------------------------

    def stop(self) -> None:
        """What the sync ``close`` does before it waits for the thread."""
        self._closed.set()
        self._armed = False
        link = self._link
        if link is not None and link.usable():
            with link._cond:  # wake the connection thread now
                link._cond.notify_all()


class StompAsyncConsumer(PushConsumer[_Core]):
    """An :class:`~kew.qchan.spi.aio.AsyncConsumer` on the sync consumer's
    threads (the module's docstring)."""

    def __init__(self, core: _Core) -> None:
        super().__init__(core)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(
        cls, connector: StompConnector, queue: str, prefetch: int
    ) -> StompAsyncConsumer:
        """A consumer subscribed to ``queue``; raises as the sync constructor
        does (``AccessRefused``, ``ConfigError``, ``BrokerUnavailable``)."""
        core = _Core(connector, queue, prefetch, asyncio.get_running_loop())
        await subscribed(core, 120)  # (as the sync constructor waits)
        return cls(core)

    @property
    def malformed(self) -> int:
        """Frames dead-lettered at once: their envelope is not kew's."""
        return self._core.malformed

    def _take(self, most: int) -> list[Delivery]:
        """kew's deliveries the buffer holds of the live connection, up to
        ``most``; the malformed ones taken with them are dead-lettered."""
        core = self._core
        good: list[Delivery] = []
        bad: list[Delivery] = []
        for _ in range(3):  # a wake-up (None) in the buffer ends a take early
            for d in core._buffer.take(most, 0, lambda: core._generation):
                if core._current(d) is None:
                    continue  # that connection is gone; the broker redelivers it
                (bad if cast(_Tag, d.tag).malformed else good).append(d)
            if good or bad:
                break
        for d in bad:  # dead-lettered by a task of their own: nothing awaited here
            task = asyncio.create_task(self._dead_letter_malformed(d))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return good

    async def _dead_letter_malformed(self, delivery: Delivery) -> None:
        core = self._core
        reason = cast(_Tag, delivery.tag).malformed or "malformed"
        core.malformed += 1
        log.warning(
            "kew: STOMP frame %s on %r is not kew's wire format; dead-lettering it: %s",
            delivery.message.id,
            core._queue,
            reason,
        )
        try:
            await self.dead_letter(delivery, reason)
        except Exception as e:  # the broker refused the dead letter: have it redelivered
            core.errors += 1
            core._dead_letter_faults += 1
            log.exception("kew: cannot dead-letter a malformed frame on %r", core._queue)
            link = core._current(delivery)
            if link is not None:
                link.close()  # the connection thread reconnects; the broker redelivers
            if core._dead_letter_faults >= core.MAX_FAULTS:
                core._fail("the broker refuses the dead letters of malformed frames", e)
            return
        core._dead_letter_faults = 0

    async def _write(self, link: _Link, ops: list[Any]) -> None:
        """Write ``ops`` on the delivery's connection; await their receipts.
        _Lost when that connection is lost (the broker redelivers)."""
        tx = self._core._c.options.batch == "tx"  # ActiveMQ: one journal sync per turn
        await self._core.pipe.submit(ops, link=cast(AioLink, link), tx=tx)

    async def ack(self, delivery: Delivery) -> None:
        core = self._core
        if not core._claim(delivery):
            return  # settled already: a second ACK frame would be an error on the broker
        link = core._current(delivery)
        if link is not None:  # written with a receipt; not awaited (see the module)
            ops: list[Any] = [("ack", cast(_Tag, delivery.tag).ack_id)]
            core.pipe.submit(ops, link=cast(AioLink, link)).add_done_callback(self._acked)

    def _acked(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, _Lost):  # lost: redelivered
            self._core.errors += 1
            log.warning("kew: the STOMP broker refused an ACK on %r: %s", self._core._queue, error)

    async def _move(self, delivery: Delivery, dest: str, extra: dict[str, str | int]) -> None:
        """Send a receipted copy of the delivery to ``dest``, then ack it."""
        core = self._core
        if not core._claim(delivery):
            return
        link = core._current(delivery)
        if link is None:
            return
        m = delivery.message
        copy = Message(m.id, m.body, m.headers, durable=True)
        try:
            headers = send_headers(core._c.dialect, copy, extra, now=now_ms())
            await self._write(link, [("send", dest, m.body, headers)])
            await self._write(link, [("ack", cast(_Tag, delivery.tag).ack_id)])  # (as sync: after)
        except _Lost:
            return  # not acked: redelivered, and may be dead-lettered again
        except BaseException:
            cast(_Tag, delivery.tag).settled = False  # not settled: the caller may try again
            raise

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """A receipted copy to ``<q>.dead`` with ``reason``, then the ACK."""
        extra: dict[str, str | int] = {
            H_DEAD_REASON: reason,
            H_DEAD_COUNT: delivery.delivery_count,
            H_DEAD_AT: now_ms(),
        }
        await self._move(delivery, self._core._c.dest(f"{self._core._queue}.dead"), extra)

    async def release(self, delivery: Delivery) -> None:
        """A receipted copy back to the queue (``kew-redeliveries`` + 1), then the ACK."""
        headers = cast(_Tag, delivery.tag).headers
        extra: dict[str, str | int] = {H_REDELIVERIES: delivery_count(headers)}
        await self._move(delivery, self._core._dest, extra)

    async def close(self) -> None:
        """Stop; the broker redelivers every unsettled delivery when the
        connection closes (after the settlements queued are written)."""
        if self._closed:
            return
        self._closed = True
        core = self._core
        for task in list(self._tasks):
            task.cancel()
        await core.pipe.close(self.CLOSE_WAIT)
        await self._stop_core()
        link = core._link
        if link is not None:
            link.close()
        core._buffer.drop()
