"""The sends of the RabbitMQ provider's native async route: one connection
and one confirm-mode channel, run by an I/O thread of their own; each
coroutine's future resolved on its loop when its confirms arrive.

pika is not thread-safe, so the I/O thread owns the connection, as the
sync consumer's does (:mod:`kew_rabbitmq._consumer`).  A coroutine's send
appends its messages to what waits and, if no wake-up is pending, asks the
I/O thread for one (``add_callback_threadsafe``); the thread publishes all
that waits (``mandatory``, delayed messages to their TTL delay queues, as
the sync producer does) and goes on reading.  So concurrent sends are
pipelined: 1,000 concurrent ``await send(...)`` are 1,000 messages in
flight on one channel, written in a few socket writes, and the broker's
confirms (``multiple`` ones too) come back while more are written.  When
the last confirm of a send arrives the thread hands the send to its loop
(``loop.call_soon_threadsafe``, one wake-up for every send finished
meanwhile), which resolves the futures ``RESOLVE_EACH`` a turn: each
``await`` returns once its own messages are confirmed (stored, for a
persistent message in a durable queue).

Failures are the sync producer's: a nack or a return (no such queue) fails
that send with :class:`SendError`; a lost connection (or channel, or no
confirm within ``TIMEOUT``) is reconnected and the sends in flight on it
are published again, once (at-least-once; a second loss fails them with
:class:`BrokerUnavailable`, a permission refused twice with
:class:`AccessRefused`); a connection that cannot be opened fails what
waits with the error :func:`~kew_rabbitmq._connection.open_connection`
gives, and the thread ends (the next send starts another).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import AMQPConnectionError, AMQPError, ChannelClosedByBroker

from kew.qchan.spi import AccessRefused, BrokerUnavailable, KewError, Message, SendError
from kew.qchan.spi.kit import Backoff
from kew_rabbitmq._connection import (
    close_quietly,
    coalesce,
    nothing,
    open_connection,
    reset_in_child,
)
from kew_rabbitmq._envelope import delay_arguments, delay_route, properties

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

__all__ = ["RESOLVE_EACH", "Publisher"]

log = logging.getLogger("kew.rabbitmq")

#: Futures resolved per turn of the loop: the coroutines they wake run in
#: the next turn, and timers fire between turns (the loop lag stays low).
RESOLVE_EACH = 64

Loop = asyncio.AbstractEventLoop


class _Send:
    """One coroutine's send (one message, or a batch) and its future."""

    __slots__ = ("attempts", "error", "future", "label", "loop", "messages", "pending", "written")

    def __init__(self, messages: Sequence[tuple[str, Message]], label: str, loop: Loop) -> None:
        self.messages = messages
        self.label = label
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.attempts = 0  # connections it was written on and lost
        self.pending = 0  # its messages not confirmed yet
        self.error: BaseException | None = None
        self.written = 0.0  # monotonic time it was last written


class Publisher:
    """The I/O thread that publishes every send of an async connector."""

    #: Longest a written message waits for its confirm before the connection
    #: counts as lost (the sync producer's ``Pipeline.TIMEOUT``).
    TIMEOUT = 120.0
    #: Longest ``close`` waits for the confirms of what was sent before it.
    CLOSE_WAIT = 30.0
    #: Messages written in one go before the I/O thread reads again.
    FLUSH_MOST = 256

    def __init__(self, connector: RabbitConnector) -> None:
        self._c = connector
        self._lock = threading.Lock()
        self._waiting: list[_Send] = []  # submitted, not written yet (under _lock)
        self._wake_asked = False  # an add_callback_threadsafe on its way (under _lock)
        self._asked_at = 0.0  # when (monotonic)
        self._thread: threading.Thread | None = None  # (under _lock)
        self._conn: Any = None  # the I/O thread's pika.BlockingConnection (under _lock)
        self._closing = threading.Event()
        self._pid = os.getpid()
        # loop -> sends done, to resolve there; loops with a resolve on its way
        self._done: dict[Loop, collections.deque[_Send]] = {}
        self._resolving: set[Loop] = set()
        self._enders: list[asyncio.Future[None]] = []  # close()s waiting for the thread's end
        # I/O thread only, per connection:
        self._channel: Any = None
        self._seq = 0
        self._unconfirmed: collections.deque[tuple[int, _Send]] = collections.deque()
        self._returned: set[str] = set()  # ids of messages the broker returned
        self._channel_closed: BaseException | None = None
        #: Connections opened; writes (each one socket write of many
        #: messages); the most messages awaiting their confirms at once.
        self.connections = 0
        self.flushes = 0
        self.most_in_flight = 0
        reset_in_child(self)

    def _in_child(self) -> None:
        """After os.fork, in the child: the I/O thread stayed in the parent."""
        self._lock = threading.Lock()
        self._waiting, self._wake_asked, self._thread, self._conn = [], False, None, None
        self._done, self._resolving, self._enders = {}, set(), []
        self._pid = os.getpid()

    # -- on the event loop ------------------------------------------------------

    async def send(self, messages: Sequence[tuple[str, Message]], label: str) -> None:
        """Publish ``(queue, message)`` pairs; return once every one is confirmed."""
        item = _Send(messages, label, asyncio.get_running_loop())
        self._submit(item)
        await item.future  # cancelled: written anyway if it was on its way

    def _submit(self, item: _Send) -> None:
        with self._lock:
            if self._closing.is_set():
                raise BrokerUnavailable(f"the async connector of {self._c.url} is closed")
            self._waiting.append(item)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="kew-amqp-aio-publish", daemon=True
                )
                self._thread.start()  # it writes what waits once connected
            elif self._conn is not None and not self._wake_asked:
                # the I/O thread is woken once the coroutines of this turn of
                # the loop have sent: one wake-up and one write for them all,
                # and no thread taking the GIL from the loop meanwhile
                self._wake_asked, self._asked_at = True, time.monotonic()
                item.loop.call_soon(self._wake, self._conn)

    def _wake(self, conn: Any) -> None:
        """Have the I/O thread write what waits (on the loop, in the turn
        after the sends)."""
        try:
            conn.add_callback_threadsafe(self._flush)
        except Exception:  # lost meanwhile: the next connection writes what waits
            with self._lock:
                if self._conn is conn:
                    self._wake_asked = False

    def _resolve(self, loop: Loop) -> None:
        """On ``loop``: resolve up to ``RESOLVE_EACH`` finished sends, and
        come back in the next turn for the rest."""
        with self._lock:
            done = self._done.get(loop)
            batch = [done.popleft() for _ in range(min(RESOLVE_EACH, len(done)))] if done else []
            more = bool(done)
            if not more:  # (no reference kept to a loop that may close)
                self._resolving.discard(loop)
                self._done.pop(loop, None)
        for item in batch:
            if item.future.done():  # its coroutine was cancelled
                continue
            if item.error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(item.error)
        if more:
            loop.call_soon(self._resolve, loop)

    async def close(self) -> None:
        """After the sends asked for so far are confirmed (at most
        ``CLOSE_WAIT`` s): the connection is closed, the thread ends."""
        ended = asyncio.get_running_loop().create_future()
        with self._lock:
            self._closing.set()
            conn = self._conn
            running = self._thread is not None and self._pid == os.getpid()
            if running:
                self._enders.append(ended)
        if not running:
            return
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(nothing)  # the I/O loop sees _closing now
        await ended  # the thread resolves it as it ends (_give_up)

    # -- handing results to the loops (any thread) --------------------------------

    def _finish(self, items: Sequence[_Send]) -> None:
        """These sends are done (their ``error`` says how): to their loops."""
        wake: list[Loop] = []
        with self._lock:
            for item in items:
                self._done.setdefault(item.loop, collections.deque()).append(item)
                if item.loop not in self._resolving:
                    self._resolving.add(item.loop)
                    wake.append(item.loop)
        for loop in wake:
            try:
                loop.call_soon_threadsafe(self._resolve, loop)
            except RuntimeError:  # that loop is closed: nobody awaits its sends
                with self._lock:
                    self._done.pop(loop, None)
                    self._resolving.discard(loop)

    # -- the I/O thread -------------------------------------------------------------

    def _run(self) -> None:
        """Connect, publish, reconnect; end when closed, or when a connection
        cannot be opened (failing what waits)."""
        backoff = Backoff()  # between a lost connection and the next
        try:
            while True:
                try:
                    conn = open_connection(self._c.options, stop=self._closing)
                except KewError as e:  # AccessRefused, BrokerUnavailable: as the sync send
                    self._give_up(e)
                    return
                opened = time.monotonic()
                try:
                    if self._serve(conn):
                        return
                except (AMQPError, OSError) as e:
                    self._lost(conn, e)
                if time.monotonic() - opened > 10:
                    backoff.reset()
                backoff.wait(self._closing)  # (closing: open_connection gives up at once)
        except BaseException as e:  # a bug: never silent, never a send left hanging
            log.exception("kew: the publishing thread of %s failed", self._c.url)
            self._give_up(BrokerUnavailable(f"kew's publishing thread failed: {e!r}"))

    def _serve(self, conn: Any) -> bool:
        """Publish on ``conn`` until closed (True) or lost (raises)."""
        self.connections += 1
        ch = conn.channel()
        ready: list[bool] = []

        def on_ready(_: Any) -> None:
            ready.append(True)
            conn.add_callback_threadsafe(nothing)  # process_data_events returns

        def on_close(_ch: Any, reason: BaseException) -> None:
            self._channel_closed = reason

        self._channel_closed = None
        ch._impl.add_on_close_callback(on_close)
        ch._impl.add_on_return_callback(self._on_return)
        ch._impl.confirm_delivery(self._on_confirm, callback=on_ready)
        deadline = time.monotonic() + 30
        while not ready:
            if time.monotonic() > deadline:
                raise AMQPConnectionError("no confirm.select-ok in time")
            conn.process_data_events(time_limit=0.2)
        self._channel, self._seq = ch, 0
        self._returned.clear()
        self._c.delay_queues.clear()  # declared again on this connection
        with self._lock:
            self._conn, self._wake_asked = conn, True
        self._flush()  # what waited for a connection
        closing_since: float | None = None
        while True:
            now = time.monotonic()
            if self._closing.is_set():  # (checked before the wait: close may not have woken us)
                closing_since = closing_since or now
                with self._lock:
                    idle = not self._waiting and not self._unconfirmed
                if idle or now - closing_since > self.CLOSE_WAIT:
                    break
            # confirms do not end the wait: closing, look again soon
            conn.process_data_events(time_limit=1.0 if closing_since is None else 0.01)
            now = time.monotonic()
            if self._waiting and (not self._wake_asked or now - self._asked_at > 1.0):
                self._flush()  # a wake-up lost: its loop closed before it ran
            if self._channel_closed is not None:
                raise self._channel_closed  # ChannelClosedByBroker: lost, as the sync producer
            if self._unconfirmed and now - self._unconfirmed[0][1].written > self.TIMEOUT:
                raise AMQPConnectionError(f"no publisher confirm in {self.TIMEOUT:g} s")
        with self._lock:
            self._conn = None
        close_quietly(conn)
        self._give_up(BrokerUnavailable(f"the async connector of {self._c.url} was closed"))
        return True

    def _flush(self) -> None:
        """Write the sends that wait (their messages follow each other on the
        channel), ``FLUSH_MOST`` messages' worth at a time: between two, the
        thread reads confirms and lets the loop have the GIL.  A failure
        puts back what was not written."""
        with self._lock:
            batch, self._waiting = self._waiting, []
            self._wake_asked = False
        ch = self._channel
        written = 0
        for i, item in enumerate(batch):
            if written >= self.FLUSH_MOST:
                with self._lock:
                    self._waiting[:0] = batch[i:]
                    self._wake_asked, self._asked_at = True, time.monotonic()
                ch.connection.call_later(0, self._flush)
                break
            if item.future.cancelled():  # its coroutine gave up before it was written
                continue
            try:
                self._write(ch, item)
            except BaseException:
                # put back what was not written (a send partly written is in
                # flight: the loss of the connection sends it again)
                partly = bool(self._unconfirmed) and self._unconfirmed[-1][1] is item
                with self._lock:
                    self._waiting[:0] = batch[i + partly :]
                raise
            written += len(item.messages)
        if written:
            self.flushes += 1
            self.most_in_flight = max(self.most_in_flight, len(self._unconfirmed))
            coalesce(ch.connection)  # one socket write for them all

    def _write(self, ch: Any, item: _Send) -> None:
        impl = ch._impl
        item.pending, item.error, item.written = len(item.messages), None, time.monotonic()
        granularity = self._c.options.delay_granularity
        for queue, m in item.messages:
            route = None if m.deliver_at is None else delay_route(queue, m, granularity)
            target = queue if route is None else route.queue
            if route is not None and self._c.delay_due(route):  # every 30 s per delay queue
                ch.queue_declare(route.queue, durable=True, arguments=delay_arguments(route))
            impl.basic_publish("", target, m.body, properties(m), mandatory=True)
            self._seq += 1
            self._unconfirmed.append((self._seq, item))

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        # a basic.return comes before the message's confirm
        self._returned.add(f"{props.message_id} ({method.reply_text})")

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        refused = isinstance(m, pika.spec.Basic.Nack)
        confirmed = self._unconfirmed
        finished: list[_Send] = []
        if m.multiple:
            while confirmed and confirmed[0][0] <= m.delivery_tag:
                self._confirmed(confirmed.popleft()[1], refused, finished)
        else:
            for i, (seq, item) in enumerate(confirmed):
                if seq == m.delivery_tag:
                    del confirmed[i]
                    self._confirmed(item, refused, finished)
                    break
        if finished:
            self._finish(finished)

    def _confirmed(self, item: _Send, refused: bool, finished: list[_Send]) -> None:
        if refused:
            item.error = SendError(f"RabbitMQ refused (nacked) a message for {item.label}")
        item.pending -= 1
        if item.pending:
            return
        if self._returned:
            ids = {m.id for _, m in item.messages}
            returned = [r for r in self._returned if r.split(" ", 1)[0] in ids]
            if returned:
                self._returned.difference_update(returned)
                item.error = SendError(
                    f"RabbitMQ refused {len(returned)} of {len(item.messages)} messages for "
                    f"{item.label}: {', '.join(returned)}"
                )
        finished.append(item)

    def _lost(self, conn: Any, e: BaseException) -> None:
        """The connection (or its channel) is gone: the sends in flight on it
        go again on the next one, once; a second loss fails them."""
        close_quietly(conn)
        with self._lock:
            self._conn, self._wake_asked = None, False
        flight = list(dict.fromkeys(item for _, item in self._unconfirmed))
        self._unconfirmed.clear()
        again, failed = [], []
        for item in flight:
            item.attempts += 1
            if item.attempts < 2 and not item.future.cancelled():
                again.append(item)
            else:
                item.error = self._failure(item, e)
                failed.append(item)
        with self._lock:
            self._waiting[:0] = again
        if failed:
            self._finish(failed)
        log.warning(
            "kew: the publishing connection to %s was lost (%r); reconnecting", self._c.url, e
        )

    def _failure(self, item: _Send, e: BaseException) -> KewError:
        if isinstance(e, ChannelClosedByBroker) and e.reply_code == 403:
            return AccessRefused(
                f"RabbitMQ at {self._c.url} refused user {self._c.options.username!r} the "
                f"permission to send to {item.label}: ({e.reply_code}) {e.reply_text}"
            )
        return BrokerUnavailable(f"sending to {item.label} at {self._c.url} failed: {e!r}")

    def _give_up(self, error: KewError) -> None:
        """Fail every send waiting or in flight with ``error``; the thread ends."""
        with self._lock:
            items, self._waiting = self._waiting, []
            self._thread, self._conn, self._wake_asked = None, None, False
            enders, self._enders = self._enders, []
        items += [item for _, item in self._unconfirmed]
        self._unconfirmed.clear()
        items = list(dict.fromkeys(items))
        for item in items:
            item.error = item.error or error
        if items:
            self._finish(items)
        for ended in enders:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                ended.get_loop().call_soon_threadsafe(_set, ended)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
