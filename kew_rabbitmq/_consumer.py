"""The consumer: one connection, run by its own I/O thread.

pika is not thread-safe, so the I/O thread owns the consumer's connection:
it connects, subscribes (``basic.qos(prefetch)``, ``basic.consume``),
receives deliveries into a :class:`~kew.qchan.spi.kit.DeliveryBuffer` for
``fetch`` (those of one round of I/O together), and writes what handler
threads queue for it: acks and requeues (one ``add_callback_threadsafe``
wake-up for all queued, not waited for), settles and dead letters (published
on a second, confirm-mode channel, acked on their confirms: its
:class:`~kew_rabbitmq._outbox.Outbox`).  It keeps heartbeats going however
long a handler runs.

The window can change while it runs (``set_prefetch``): RabbitMQ applies a
per-consumer ``basic.qos`` to new consumers only (and refuses ``global`` on
quorum queues), so the I/O thread cancels the consumer, keeping what it
delivered (:func:`~kew_rabbitmq._settle.cancel_keeping`), and consumes anew.

A message whose envelope kew cannot read (another program's: see
:mod:`kew_rabbitmq._envelope`) is dead-lettered by that thread at once with
the reason.  A lost connection is reconnected with
:class:`~kew.qchan.spi.kit.Backoff`, and the deliveries of the lost one are
dropped unsettled (the broker requeues them).  An unexpected error there is
logged and recovered from by reconnecting; too many, a login refused on
reconnect or a deleted queue make ``fetch`` raise ``ConsumerFailed``.  At
start-up a refused login is ``AccessRefused`` and an unreachable broker
``BrokerUnavailable``, from the constructor.  A consumer belongs to the
process that made it: in a child made by fork, ``fetch`` raises
``ConsumerFailed`` (make one there).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pika.exceptions import AMQPError, ChannelClosedByBroker

from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    ConsumerFailed,
    Delivery,
    Message,
    MessageTooLarge,
)
from kew.qchan.spi.kit import Backoff, DeliveryBuffer
from kew_rabbitmq._connection import coalesce, nothing, open_connection, reset_in_child
from kew_rabbitmq._envelope import delivery_count, read
from kew_rabbitmq._outbox import Outbox
from kew_rabbitmq._settle import (
    Done,
    Op,
    Settle,
    Write,
    Writes,
    cancel_keeping,
    settle_error,
    write_ack,
    write_requeue,
)

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector

log = logging.getLogger("kew.consumer")


def _tag(delivery: Delivery) -> tuple[int, int]:
    """(connection generation, AMQP delivery tag): a tag of a lost
    connection is no longer settled (the broker requeued the message)."""
    return cast(tuple[int, int], delivery.tag)


class _Cancelled(Exception):
    """The broker cancelled the consumer (basic.cancel)."""


class _NotConsumable(Exception):
    """basic.consume was refused: no such queue (404), or no access (403)."""


class RabbitConsumer:
    #: Longest a settle (or dead letter) waits for its confirms.
    COMMIT_TIMEOUT = 60.0
    #: Unexpected errors on the I/O thread (each is logged and recovered
    #: from by reconnecting) tolerated within ``UNEXPECTED_WINDOW`` seconds;
    #: one more and the consumer fails (``ConsumerFailed``).
    UNEXPECTED_LIMIT = 5
    UNEXPECTED_WINDOW = 60.0
    #: How long basic.consume may be refused (queue missing, access denied)
    #: before the consumer fails.
    GONE_AFTER = 5.0
    #: How long a resize on a quorum queue holds the acks with no delivery
    #: coming before it gives up waiting for the window to fill (``Writes.drain``).
    DRAIN_WAIT = 0.1

    def __init__(self, connector: RabbitConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._prefetch = prefetch  # the window wanted (set_prefetch), under _window
        self._window = threading.Condition()
        self._asked = self._applied = 0  # set_prefetch calls made / in effect (_window)
        self._losses = 0  # connections lost (a set_prefetch waiting gives up)
        self._quorum = connector.options.queue_type == "quorum"
        self._buffer = DeliveryBuffer()  # what the I/O thread received, per generation
        # Deliveries of one I/O round, put in the buffer together once it
        # ends (one wake-up of a waiting fetch for all, not one each); None:
        # each put at once (a subclass that acts on each delivery).
        self._round: list[Delivery] | None = (
            [] if type(self)._on_message is RabbitConsumer._on_message else None
        )
        self._generation = 0
        self._pid = os.getpid()
        self._conn: Any = None  # the I/O thread's pika.BlockingConnection
        self._channel: Any = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._start_error: BaseException | None = None  # why it could not start
        self._failure: tuple[str, BaseException | None] | None = None  # for good
        self._ops_lock = threading.Lock()
        self._ops: list[Op] = []  # for the I/O thread
        self._held: set[int] = set()  # delivery tags of this generation not settled
        self._flush_scheduled = False
        # the confirm channel, and the settles waiting on it
        self._outbox = Outbox(connector, queue, self._ops_lock, self._write)
        # I/O thread only, per connection:
        self._cancelled = False  # by the broker
        self._ctag = ""  # the consumer's tag on the current connection
        self._consuming = 0  # its window
        self._writes = Writes()
        self.reconnects = 0
        self.unexpected_errors = 0  # on the I/O thread, each logged with its traceback
        reset_in_child(self)
        self._thread = threading.Thread(target=self._run_io, name=f"kew-amqp-{queue}", daemon=True)
        self._thread.start()
        self._wait_started()

    def _wait_started(self) -> None:
        """Wait until the I/O thread subscribed, or raise why it could not
        (the async route awaits it instead: :mod:`kew_rabbitmq._aio_consumer`)."""
        self._ready.wait()  # the I/O thread sets it whether it subscribed or not
        self._raise_start_error()

    def _raise_start_error(self) -> None:
        error = self._start_error
        if error is not None:
            why = f"cannot consume from {self._queue!r} at {self._c.url}: {error}"
            if isinstance(error, AccessRefused):
                raise AccessRefused(why) from error
            raise BrokerUnavailable(why) from error
        self._check()  # e.g. no such queue

    def _in_child(self) -> None:
        """After os.fork, in the child: the I/O thread stayed in the parent,
        whose threads may have held these locks; fetch raises."""
        self._buffer, self._ops_lock = DeliveryBuffer(), threading.Lock()
        self._outbox.lock = self._ops_lock
        self._ops, self._flush_scheduled = [], False

    # The I/O thread: owns the connection, reconnects, resubscribes.  Nothing
    # ends it but close() or a failure for good (then fetch raises
    # ConsumerFailed): a message kew cannot read is dead-lettered
    # (_on_message), an unexpected error is logged and recovered from like a
    # lost connection, up to UNEXPECTED_LIMIT of them in UNEXPECTED_WINDOW s.
    def _run_io(self) -> None:
        try:
            self._io_loop()
        except BaseException as e:  # a bug in the recovery itself: never silent
            log.exception("kew: the I/O thread of the consumer of %s failed", self._queue)
            self._fail(f"its I/O thread failed: {type(e).__name__}: {e}", e)

    def _io_loop(self) -> None:
        backoff = Backoff()
        unexpected: collections.deque[float] = collections.deque()
        refused_since: float | None = None
        lost_at_start = 0
        while not self._closed.is_set():
            try:
                conn = self._subscribe()
                refused_since = None
                self._ready.set()
                backoff.reset()
                while not self._closed.is_set():
                    conn.process_data_events(time_limit=0.2)
                    if self._cancelled:
                        raise _Cancelled()
                    if self._asked != self._applied and not self._closed.is_set():
                        self._resize(conn)  # (what arrives meanwhile waits for the put)
                    if self._round:
                        self._put_round()
                with contextlib.suppress(AMQPError):
                    self._flush_ops()  # acks queued while closing
                    deadline = time.monotonic() + 10
                    while self._outbox.waiting and time.monotonic() < deadline:
                        conn.process_data_events(time_limit=0.2)
                    conn.close()
                self._outbox.fail_open("the consumer was closed first")
                return
            except (AccessRefused, BrokerUnavailable) as e:
                if not self._ready.is_set():  # at start: the constructor raises it
                    self._start_failed(e)
                    return
                if isinstance(e, AccessRefused):  # the login or the vhost: final
                    self._fail(str(e), e)
                    return
                # the retries of one reconnect are spent: go on trying
            except _Cancelled:
                # The broker cancelled the consumer: its queue was deleted (by
                # an operator, or by kew's delete()), or on a cluster became
                # unavailable.  Subscribing again tells which: a queue that is
                # there is consumed again; one missing for GONE_AFTER s fails
                # the consumer (below).  It does not declare the queue again:
                # that would undo an operator's deletion, and race delete()
                # (a queue back without its dead letters).  A supervisor that
                # restarts the process on ConsumerFailed declares it anew.
                log.warning("kew: the broker cancelled the consumer of %s", self._queue)
            except _NotConsumable as e:
                now = time.monotonic()
                refused_since = now if refused_since is None else refused_since
                if now - refused_since >= self.GONE_AFTER:
                    self._fail(str(e), e)
                    return
            except (AMQPError, OSError) as e:
                # the connection was lost: reconnect (at start, as often as
                # connecting is retried)
                lost_at_start += not self._ready.is_set()
                if lost_at_start > self._c.options.retries:
                    self._start_failed(BrokerUnavailable(f"the connection was lost: {e!r}"))
                    return
            except Exception as e:
                log.exception("kew: unexpected error on the I/O thread of %s", self._queue)
                self.unexpected_errors += 1
                now = time.monotonic()
                unexpected.append(now)
                while unexpected[0] < now - self.UNEXPECTED_WINDOW:
                    unexpected.popleft()
                if len(unexpected) >= self.UNEXPECTED_LIMIT:
                    self._fail(
                        f"{len(unexpected)} unexpected errors on its I/O thread within "
                        f"{self.UNEXPECTED_WINDOW:.0f} s, the last: {type(e).__name__}: {e}",
                        e,
                    )
                    return
            self._lose("the connection was lost")
            if self._closed.is_set():
                return
            self.reconnects += 1
            backoff.wait(self._closed)

    def _subscribe(self) -> Any:
        """Connect, open the consumer's and the confirm channel, consume."""
        conn = open_connection(self._c.options, stop=self._closed)
        with self._window:
            window, asked = self._prefetch, self._asked
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=window)
            self._outbox.connect(conn)
            self._outbox.fail_open("the connection was lost")  # their ops are void
            with self._ops_lock:  # ops of the lost connection are void
                self._ops, self._flush_scheduled = [], False
                self._held.clear()
                self._generation += 1
                self._conn, self._channel = conn, ch
            self._writes = Writes()
            self._c.delay_queues.clear()  # declared again on this connection
            self._cancelled = False
            ch.add_on_cancel_callback(self._on_cancel)
            self._consume(ch, window)
        except BaseException:
            if conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()
            raise
        self._resized(asked)
        return conn

    def _consume(self, ch: Any, window: int) -> None:
        """basic.consume (after a basic.qos of ``window``): a new tag."""
        try:
            self._ctag = ch.basic_consume(self._queue, self._on_message)
            self._consuming = window
            self._writes.consumed()
        except ChannelClosedByBroker as e:
            if e.reply_code not in (403, 404):
                raise
            raise _NotConsumable(
                f"cannot consume from {self._queue!r}: ({e.reply_code}) {e.reply_text}"
            ) from e

    # -- the window (set_prefetch: any thread; _resize: the I/O thread) --

    def set_prefetch(self, count: int) -> None:
        """From now on the broker pushes at most ``count`` deliveries on top
        of those held already (which stay held and ackable).  Waits for the
        I/O thread to consume with it (a few round trips; on a quorum queue
        first for the consumer's credit to run out: ``Writes.drain``), not
        for a lost connection (the next one consumes with it) nor a closed one."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"prefetch must be an int >= 1, not {count!r}")
        with self._window:
            self._prefetch = count
            self._asked += 1
            asked, losses = self._asked, self._losses
        conn = self._conn
        if conn is None or not conn.is_open or self._pid != os.getpid():
            return  # lost: the next connection consumes with it
        if threading.current_thread() is self._thread:
            return  # the I/O loop sees it when this callback returns
        try:
            conn.add_callback_threadsafe(nothing)  # the I/O loop sees it now
        except Exception:
            return  # lost: the next connection consumes with it
        with self._window:
            self._window.wait_for(
                lambda: (
                    self._applied - asked >= 0
                    or self._losses != losses
                    or self._closed.is_set()
                    or self._failure is not None
                ),
                self.COMMIT_TIMEOUT,
            )

    def _resized(self, asked: int) -> None:
        with self._window:
            self._applied = asked
            self._window.notify_all()

    def _resize(self, conn: Any) -> None:
        """Consume again with the window asked for: cancel (keeping what the
        consumer delivered), basic.qos, basic.consume."""
        with self._window:
            window, asked = self._prefetch, self._asked
        if window != self._consuming:
            ch, writes = self._channel, self._writes
            if self._quorum:
                writes.drain(conn, ch, self._queue, self._consuming, self.DRAIN_WAIT)
            cancel_keeping(conn, ch, self._ctag, self._check_cancelled)
            writes.release(ch)
            ch.basic_qos(prefetch_count=window)
            self._consume(ch, window)
        self._resized(asked)

    def _on_cancel(self, _frame: Any) -> None:
        self._cancelled = True  # the I/O loop subscribes again

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise _Cancelled()

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        # callbacks come only for the current connection
        tag = (self._generation, method.delivery_tag)
        self._writes.delivered(method.delivery_tag)
        with self._ops_lock:
            self._held.add(method.delivery_tag)
        count = delivery_count(props, method.redelivered, self._quorum)
        message, why = read(props, body)
        delivery = Delivery(message, count, tag)
        if why:
            self._dead_letter_soon(delivery, why)
        elif self._round is not None:
            self._round.append(delivery)
        else:
            self._buffer.put(self._generation, delivery)

    def _put_round(self) -> None:
        """On the I/O thread, after a round of I/O: what arrived in it to
        the buffer (a fetch waiting is woken once: the first put)."""
        arrived, self._round = self._round or [], []
        generation, put = self._generation, self._buffer.put
        for delivery in arrived:
            put(generation, delivery)

    def _dead_letter_soon(self, delivery: Delivery, reason: str) -> None:
        """On the I/O thread: a message kew cannot read goes to the dead
        letters at once: published on the confirm channel and acked on its
        confirm (a settle), not waited for, so the I/O thread goes on."""
        mid = delivery.message.id
        log.warning("kew: dead-lettering message %s of %s: %s", mid, self._queue, reason)

        def done(error: BaseException | None) -> None:
            if error is not None:  # not acked: it comes again
                log.warning("kew: could not dead-letter message %s: %s", mid, error)

        try:
            sends = [self._outbox.dead_send(delivery, reason)]
        except Exception as e:  # a bug of kew's: keep the body and the reason
            log.exception("kew: cannot write message %s's headers", mid)
            bare = Delivery(
                Message(mid, delivery.message.body), delivery.delivery_count, delivery.tag
            )
            sends = [self._outbox.dead_send(bare, f"{reason} [headers left out: {e!r}]"[:10_000])]
        self._send_then_ack([delivery], sends, done, held_only=True)

    def _lose(self, why: str) -> None:
        """The connection is gone (or is given up): close it, fail what waited
        on it; the broker requeues what it held."""
        lost = self._conn
        if lost is not None and lost.is_open:  # e.g. only the channel failed
            with contextlib.suppress(Exception):
                lost.close()
        with self._window:  # a set_prefetch waiting returns
            self._losses += 1
            self._window.notify_all()
        self._outbox.lost()
        self._outbox.fail_open(why)
        if self._round:
            self._round = []  # the broker delivers them again
        self._buffer.drop()

    def _start_failed(self, error: BaseException) -> None:
        """Before it ever subscribed: the constructor raises ``error``."""
        self._start_error = error
        self._fail(str(error), error, log_it=False)

    def _fail(self, why: str, cause: BaseException | None, log_it: bool = True) -> None:
        """For good: fetch raises ConsumerFailed from now on."""
        self._failure = (f"the consumer of {self._queue!r} at {self._c.url} failed: {why}", cause)
        if log_it:
            log.error("kew: %s", self._failure[0])
        self._lose(why)
        with self._ops_lock:
            self._ops, self._flush_scheduled = [], False
            self._held.clear()
            self._generation += 1
            self._conn = None
        self._buffer.wake()  # a waiting fetch returns
        self._ready.set()

    def _check(self) -> None:
        if self._pid != os.getpid():
            raise ConsumerFailed(
                f"the consumer of {self._queue!r} at {self._c.url} was made in process "
                f"{self._pid}; a consumer does not cross os.fork (make one in this process)"
            )
        failure = self._failure
        if failure is None and not self._thread.is_alive() and not self._closed.is_set():
            failure = (f"the I/O thread of the consumer of {self._queue!r} has ended", None)
        if failure is not None:
            raise ConsumerFailed(failure[0]) from failure[1]

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        self._check()
        out = self._buffer.take(max_count, timeout, lambda: self._generation)
        self._check()
        return out

    def _take(self, deliveries: Sequence[Delivery]) -> list[int]:
        """The tags of these deliveries still held on the current
        connection, no longer held (caller holds ``_ops_lock``)."""
        tags = []
        for d in deliveries:
            generation, tag = _tag(d)
            if generation == self._generation and tag in self._held:
                self._held.discard(tag)
                tags.append(tag)
        return tags

    def _schedule(self, op: Callable[[Any], None]) -> int | None:
        """Queue ``op`` for the I/O thread; one wake-up serves every op queued
        until it runs.  Caller holds ``_ops_lock``.  The generation it runs
        for, or None if the connection is gone (or is a forked parent's)."""
        conn = self._conn
        if conn is None or not conn.is_open or self._pid != os.getpid():
            return None
        generation = self._generation
        self._ops.append((generation, op))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                conn.add_callback_threadsafe(self._flush_ops)
            except Exception:  # closed meanwhile: its ops are void
                self._ops, self._flush_scheduled = [], False
                return None
        return generation

    def _flush_ops(self) -> None:
        """On the I/O thread: write the queued ops."""
        with self._ops_lock:
            ops, self._ops = self._ops, []
            self._flush_scheduled = False
            generation = self._generation
        ch = self._channel
        for op_generation, op in ops:
            if op_generation == generation:
                op(ch)
        if self._conn is not None:
            coalesce(self._conn)  # one send() for them all, not one per frame

    def _write(self, op: Write, tag: int) -> None:
        """On the I/O thread: ack or requeue ``tag`` (a settle's, confirmed)."""
        self._writes.write(self._channel, op, tag)

    def _release_soon(self, delivery: Delivery, op: Write) -> None:
        """Ack or requeue: queued for the I/O thread, not waited for (if the
        connection drops first, the broker requeues the message anyway)."""
        with self._ops_lock:  # atomic with a reconnect's reset
            tags = self._take([delivery])
            if tags:
                self._schedule(lambda ch: self._writes.write(ch, op, tags[0]))

    def ack(self, delivery: Delivery) -> None:
        self._release_soon(delivery, write_ack)

    def release(self, delivery: Delivery) -> None:
        self._release_soon(delivery, write_requeue)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: :meth:`settle_async`, waited for."""
        self._wait(lambda done: self.settle_async(acks, sends, done))

    def settle_async(
        self,
        acks: Sequence[Delivery],
        sends: Sequence[tuple[str, Message]],
        done: Done,
    ) -> None:
        """The sends published on the confirm channel, the acks written once
        every one is confirmed; then ``done`` is called on the I/O thread
        (at once if there is nothing to send: plain acks)."""
        limit = self._c.max_message_size
        for queue, m in sends:
            if len(m.body) > limit:
                raise MessageTooLarge(len(m.body), limit, queue)
        if not sends:
            for delivery in acks:
                self.ack(delivery)
            done(None)
            return
        self._send_then_ack(acks, sends, done)

    def _send_then_ack(
        self,
        acks: Sequence[Delivery],
        sends: Sequence[tuple[str, Message]],
        done: Done,
        held_only: bool = False,
    ) -> None:
        """Schedule the sends, and the acks on their confirms; ``done`` once
        finished.  ``held_only``: nothing to do (``done(None)``) unless one
        of ``acks`` is still held."""
        with self._ops_lock:  # atomic with a reconnect's reset
            tags = self._take(acks)
            if held_only and not tags:
                lost = None  # settled already, or requeued by the broker
            else:
                entry = Settle(tags, [m.id for _, m in sends], done)
                lost = self._schedule(lambda _ch: self._outbox.publish(entry, sends)) is None
                if not lost:
                    self._outbox.open.add(entry)
        if lost is None:
            done(None)
        elif lost:
            done(settle_error(self._c.url, self._queue, "the connection is lost"))

    def _wait(self, start: Callable[[Done], None]) -> None:
        """``start(done)``, then wait for ``done`` (not on the I/O thread,
        which calls it later); raise what it failed with."""
        outcome: list[BaseException | None] = []
        finished = threading.Event()

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        start(done)
        if threading.current_thread() is self._thread:
            return
        if not finished.wait(self.COMMIT_TIMEOUT):
            raise settle_error(self._c.url, self._queue, "no publisher confirm in time")
        if outcome[0] is not None:
            raise outcome[0]

    def _dead_send(self, delivery: Delivery, reason: str) -> tuple[str, Message]:
        return self._outbox.dead_send(delivery, reason)  # (the async route's too)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        sends = [self._outbox.dead_send(delivery, reason)]
        with contextlib.suppress(BrokerUnavailable):  # not acked: delivered again
            self._wait(lambda done: self._send_then_ack([delivery], sends, done, held_only=True))

    def close(self) -> None:
        self._closed.set()
        with self._window:  # a set_prefetch waiting returns
            self._window.notify_all()
        if self._pid == os.getpid():
            conn = self._conn
            if conn is not None and conn.is_open:
                with contextlib.suppress(Exception):
                    conn.add_callback_threadsafe(nothing)  # the I/O loop sees _closed now
            self._thread.join(10)
        self._buffer.drop()
