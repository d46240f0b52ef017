"""``stomp://`` and ``stomp+ssl://``: queues on a STOMP 1.2 broker, with stomp.py.

Apache Artemis (the default dialect), ActiveMQ Classic and RabbitMQ's STOMP
plugin.  The ``dialect`` option picks the broker-specific headers:

============  ==========================  ===========================  ==================
dialect       queue addressing            delayed delivery             prefetch
============  ==========================  ===========================  ==================
artemis       ``<q>`` + ANYCAST headers   ``AMQ_SCHEDULED_TIME``       consumer-window-size
activemq      ``/queue/<q>``              ``AMQ_SCHEDULED_DELAY``      activemq.prefetchSize
rabbitmq      ``/queue/<q>``              TTL delay queues             prefetch-count
============  ==========================  ===========================  ==================

Durable send: ``persistent:true`` and a RECEIPT awaited before ``send``
returns; ``send_many`` writes every frame, then awaits every receipt (one
round trip per batch).  Consumers subscribe with ``client-individual`` acks.
NACK is never used (Artemis has discarded NACKed STOMP messages,
ARTEMIS-1983; ActiveMQ sends them to its own DLQ): a dead letter is sent to
``<q>.dead`` with its reason, receipted, then the original is acked; a
release sends a receipted copy (``kew-redeliveries`` + 1), then acks.

Connections are kew's own (``kew_artemis._link``): stomp.py's reconnect is
off (it races, stomp.py #114/#308/#351).  Each producer, consumer and the
connector hold one connection, opened at their first operation (never by
``kew.connect`` or ``kew.Queue``); a lost one is dropped and a new one made
(failover list in URL order, :class:`~kew.qchan.spi.kit.Backoff`,
``retries`` rounds); a consumer's own thread resubscribes, and deliveries of
the lost connection are never settled (the broker redelivers them).
Heartbeats both ways.  A refused login is :class:`AccessRefused` at once,
never retried; a consumer refused when it reconnects fails for good
(``ConsumerFailed`` from ``fetch``).  A connection belongs to the process
that opened it: after ``os.fork`` the child opens its own.

Every MESSAGE frame is read on its own (``_frames.read_frame``, through
:mod:`kew.qchan.spi.wire`); one kew cannot read is dead-lettered at once by
``fetch`` with the reason, keeping its body, and the frames around it flow
on.  Nothing a frame holds stops the receiver thread (kew splits the frames
itself: ``_link._FrameReader``); an unexpected error there drops the
connection, and repeated errors of the consumer's thread end in
``ConsumerFailed`` from ``fetch``.  Settling a delivery twice does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    Capability,
    ConfigError,
    ConnectorBase,
    ConsumerFailed,
    Delivery,
    KewError,
    Message,
    MessageTooLarge,
    ProviderURL,
    SendError,
    now_ms,
)
from kew.qchan.spi.kit import Backoff, DeliveryBuffer
from kew.qchan.spi.wire import H_DEAD_AT, H_DEAD_COUNT, H_DEAD_REASON, Malformed
from kew_artemis._browser import StompBrowser
from kew_artemis._frames import (
    H_ID,
    H_INTS,
    H_REDELIVERIES,
    _from_frame,
    delivery_count,
    destination,
    read_frame,
    salvage_frame,
    send_frame,
    send_headers,
    subscribe_headers,
)
from kew_artemis._link import _Link, _Lost, reset_in_child
from kew_artemis._options import DIALECTS, SCHEMES, Options

if TYPE_CHECKING:
    from kew_artemis._aio import StompAsyncConnector

__all__ = [
    "DIALECTS",
    "H_ID",
    "H_INTS",
    "SCHEMES",
    "Options",
    "StompBrowser",
    "StompConnector",
    "StompConsumer",
    "StompProducer",
    "_from_frame",
    "connect",
    "destination",
    "read_frame",
    "send_frame",
    "send_headers",
    "subscribe_headers",
]

log = logging.getLogger("kew.stomp")


# -- options (read by kew_artemis._options: SCHEMES, DIALECTS, Options; checked
# by kew.connect without network I/O, unknown ones refused with the list) ------


# -- connector -------------------------------------------------------------


class StompConnector(ConnectorBase):
    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted
        self.max_message_size = self.options.max_message_size
        self.dialect = self.options.dialect
        self.lacks: Mapping[Capability, str] = {}
        if self.dialect != "activemq":
            self.lacks = {
                Capability.BROWSE: f"STOMP has no browse on {self.dialect}; reading without "
                "taking would mark messages redelivered"
            }
        self._lock = threading.Lock()
        self._link: _Link | None = None  # made at the first operation, not here
        reset_in_child(self)

    def __repr__(self) -> str:
        return f"StompConnector({self.url!r})"

    def _in_child(self) -> None:
        """After os.fork, in the child: the parent's thread may have held the lock."""
        self._lock = threading.Lock()

    def dest(self, queue: str) -> str:
        return destination(self.dialect, queue)

    def link(self) -> _Link:
        """This process's connection, opened (again) when there is none."""
        if self._link is None or not self._link.usable():
            if self._link is not None:
                self._link.close()  # a forked parent's is dropped without a frame
            self._link = _Link(self.options, self.url).open()
        return self._link

    def declare(self, queue: str) -> None:
        # STOMP brokers create queues on first use (RabbitMQ: durable, on
        # SEND or SUBSCRIBE to /queue/...); connecting checks the broker.
        with self._lock:
            self.link()

    def producer(self, queue: str) -> StompProducer:
        return StompProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> StompConsumer:
        return StompConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> StompBrowser:
        return StompBrowser(self, queue)

    def delete(self, queue: str) -> None:
        """STOMP cannot delete a queue: drain it and its dead letters (the
        broker removes idle empty queues itself where configured to).
        Delayed messages still in the broker's scheduler stay there."""
        b = self.browser(queue)
        b.purge()
        b.purge_dead()

    def aio(self) -> StompAsyncConnector:
        """The native async route (``kew.aio``): a
        :class:`kew_artemis._aio.StompAsyncConnector`, receipts resolving
        the awaits of concurrent sends on one connection; no I/O here."""
        from kew_artemis._aio import StompAsyncConnector  # (it imports this module's parts)

        return StompAsyncConnector(self)

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()
            self._link = None


# -- producer --------------------------------------------------------------

_Frame = tuple[str, bytes, dict[str, str]]


class StompProducer:
    def __init__(self, connector: StompConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._lock = threading.Lock()
        self._link: _Link | None = None
        reset_in_child(self)

    def _in_child(self) -> None:
        self._lock = threading.Lock()

    def _frames(self, messages: Sequence[Message]) -> list[_Frame]:
        now = now_ms()
        g = self._c.options.delay_granularity
        out = []
        for m in messages:
            if len(m.body) > self._c.max_message_size:
                raise MessageTooLarge(len(m.body), self._c.max_message_size, self._queue)
            dest, headers = send_frame(self._c.dialect, self._queue, m, now=now, granularity=g)
            out.append((dest, m.body, headers))
        return out

    def _usable_link(self, frames: list[_Frame]) -> _Link:
        """This process's connection; a new one when the last is lost, or
        when it declared a delay queue of these frames so long ago that the
        queue could expire before the message (:meth:`_Link.declares_stale`)."""
        dests = [dest for dest, _, headers in frames if "x-expires" in headers]
        link = self._link
        if link is not None and (not link.usable() or link.declares_stale(dests)):
            link.close()
            link = None
        if link is None:
            link = self._link = _Link(self._c.options, self._c.url).open()
            link.declares_stale(dests)
        return link

    def _send(self, frames: list[_Frame]) -> None:
        o = self._c.options
        with self._lock:
            for attempt in (1, 2, 3):
                try:
                    link = self._usable_link(frames)
                    receipts = []
                    tx = None
                    if o.batch == "tx" and len(frames) > 1:
                        tx = link.new_receipt()
                        link.frame(link.conn.begin, tx)
                    for dest, body, headers in frames:
                        if tx is not None:  # stored at COMMIT; its receipt covers it
                            link.send(dest, body, {**headers, "transaction": tx}, None)
                            continue
                        rid = link.new_receipt()
                        link.send(dest, body, headers, rid)
                        receipts.append(rid)
                    if tx is not None:  # one journal sync for the batch
                        rid = link.new_receipt()
                        link.frame(link.conn.commit, tx, headers={"receipt": rid})
                        receipts.append(rid)
                    link.wait(receipts, o.receipt_timeout)
                    return
                except _Lost as e:  # reconnect and send again: at-least-once
                    if attempt == 3:
                        raise BrokerUnavailable(
                            f"sending to {self._queue!r} at {self._c.url} failed: {e}"
                        ) from None

    def send(self, message: Message) -> None:
        self._send(self._frames([message]))

    def send_many(self, messages: Sequence[Message]) -> None:
        if messages:
            self._send(self._frames(messages))

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()
            self._link = None


# -- consumer --------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Tag:
    """A delivery's handle: the connection generation it came on, the ack
    id, the frame's headers, why the frame is not kew's wire format (if it
    is not: ``fetch`` dead-letters it at once), and whether it was settled
    (a second ack, dead letter or release of it does nothing)."""

    generation: int
    ack_id: str
    headers: dict[str, str]
    malformed: str | None = None
    settled: bool = field(default=False)


class StompConsumer:
    #: Unexpected errors in a row (connection thread, dead-lettering a
    #: malformed frame) after which the consumer fails for good.
    MAX_FAULTS = 5

    def __init__(self, connector: StompConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._dest = connector.dest(queue)
        self._prefetch = prefetch
        #: What the connection thread received, per connection (generation).
        self._buffer = DeliveryBuffer()
        self._generation = 0
        self._link: _Link | None = None
        self._pid = os.getpid()
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._failed: BaseException | None = None  # why it could not start
        self._fatal: ConsumerFailed | None = None  # why it can never deliver again
        self._send_lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._dead_letter_faults = 0
        self.reconnects = 0
        #: Unexpected exceptions (each logged): in the connection thread, in
        #: reading a frame, in dead-lettering a malformed one.
        self.errors = 0
        #: Frames dead-lettered at once because their envelope is not kew's.
        self.malformed = 0
        reset_in_child(self)
        self._thread = threading.Thread(target=self._run, name=f"kew-stomp-{queue}", daemon=True)
        self._thread.start()
        self._wait_started()

    def _wait_started(self) -> None:
        """Wait for the first subscription (the async route awaits it instead)."""
        self._ready.wait(120)
        self._raise_start_error()

    def _raise_start_error(self) -> None:
        """Raise why the consumer could not start, if it could not."""
        if self._failed is not None or not self._ready.is_set():
            self._closed.set()
            why = f"cannot consume from {self._queue!r} at {self._c.url}: {self._failed}"
            if isinstance(self._failed, AccessRefused | ConfigError):
                raise type(self._failed)(why) from self._failed
            raise BrokerUnavailable(why)

    def _set_ready(self) -> None:
        """Started (subscribed), or failed to start: ``_failed`` says."""
        self._ready.set()

    def _new_link(self) -> _Link:
        """A connection for the next session (not opened yet)."""
        return _Link(self._c.options, self._c.url, self._on_message)

    def _in_child(self) -> None:
        """After os.fork, in the child: the connection thread stayed in the
        parent, whose threads may have held these locks.  fetch raises."""
        self._buffer, self._closed = DeliveryBuffer(), threading.Event()
        self._send_lock, self._settle_lock = threading.Lock(), threading.Lock()

    # kew's connection state machine: connect, subscribe, wait for a loss, again.
    def _run(self) -> None:
        faults = 0
        backoff, after_fault = Backoff(), Backoff(first=0.2)
        try:
            while not self._closed.is_set():
                try:
                    if not self._session(backoff):
                        return
                    faults = 0
                    after_fault.reset()
                except Exception as e:
                    self.errors += 1
                    faults += 1
                    log.exception("kew: the STOMP consumer of %r failed; reconnecting", self._queue)
                    if not self._ready.is_set():
                        self._failed = e
                        self._set_ready()
                        return
                    if faults >= self.MAX_FAULTS:
                        raise
                    self._drop_link()
                    after_fault.wait(self._closed)
        except BaseException as e:
            self._fail(f"its connection thread stopped after {faults} errors in a row", e)
            if not isinstance(e, Exception):
                raise

    def _session(self, backoff: Backoff) -> bool:
        """One connection: connect, subscribe, wait until it is lost.  False
        to stop: closed, refused at start, or refused for good."""
        try:
            link = self._new_link().open()
        except KewError as e:  # BrokerUnavailable after the retries, AccessRefused at once
            if not self._ready.is_set():
                self._failed = e
                self._set_ready()
                return False
            if isinstance(e, AccessRefused):  # the passcode changed: retrying cannot help
                self._fail("the broker refused its login when it reconnected", e)
                return False
            backoff.wait(self._closed)
            return True
        self._generation += 1
        generation = self._generation
        link.generation = generation
        self._link = link
        try:
            o = self._c.options
            headers = subscribe_headers(self._c.dialect, self._prefetch, o.window_bytes)
            rid = link.new_receipt()
            link.frame(
                link.conn.subscribe,
                self._dest,
                id=f"sub-{generation}",
                ack="client-individual",
                headers={**headers, "receipt": rid},
            )
            link.wait([rid], o.receipt_timeout)
        except (_Lost, SendError) as e:
            refused = (link.lost or "").startswith("broker error")
            link.close()
            if not self._ready.is_set() and (isinstance(e, SendError) or refused):
                self._failed = e  # the broker refused the subscription
                self._set_ready()
                return False
            backoff.wait(self._closed)
            return True
        self._set_ready()
        backoff.reset()
        with link._cond:
            while link.lost is None and not self._closed.is_set():
                link._cond.wait(0.2)
        if self._closed.is_set():
            return False
        # lost: the broker hands back whatever that connection held
        self.reconnects += 1
        self._drop_link()
        backoff.wait(self._closed)
        return True

    def _drop_link(self) -> None:
        link = self._link
        self._buffer.drop()
        if link is not None:
            link.close()

    def _fail(self, why: str, cause: BaseException | None = None) -> None:
        """The consumer can never deliver again: ``fetch`` raises it."""
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        fatal = ConsumerFailed(
            f"the STOMP consumer of {self._queue!r} at {self._c.url} failed: {why}{detail}"
        )
        fatal.__cause__ = cause
        self._fatal = fatal
        log.error("kew: %s", fatal)
        self._buffer.wake()

    def _on_message(self, link: _Link, headers: dict[str, str], body: bytes) -> None:
        """stomp.py's receiver thread: every frame becomes a delivery, or a
        malformed one that ``fetch`` dead-letters at once."""
        tag = _Tag(link.generation, headers.get("ack") or headers.get("message-id", ""), headers)
        try:
            message, count = read_frame(headers, body)
            self._buffer.put(link.generation, Delivery(message, count, tag))
            return
        except Malformed as e:
            tag.malformed = str(e)
        except Exception as e:  # a fault of kew's own: that frame is dead-lettered, the rest flow
            self.errors += 1
            log.exception("kew: cannot read a STOMP frame on %r", self._queue)
            tag.malformed = str(
                Malformed(f"kew could not read the frame ({type(e).__name__}: {e})")
            )
        try:
            kept = salvage_frame(headers, body)
        except Exception:
            self.errors += 1
            log.exception("kew: cannot salvage a STOMP frame on %r", self._queue)
            kept = Message(f"stomp-{link.new_receipt()}", body, {})
        self._buffer.put(link.generation, Delivery(kept, delivery_count(headers), tag))

    def _check(self) -> None:
        if self._pid != os.getpid():
            raise ConsumerFailed(
                f"the STOMP consumer of {self._queue!r} was made in process {self._pid}; a "
                "consumer does not cross os.fork (make one in this process)"
            )
        if self._fatal is not None:
            raise self._fatal
        if not self._thread.is_alive() and not self._closed.is_set() and self._ready.is_set():
            self._fail("its connection thread is gone")
            raise cast(ConsumerFailed, self._fatal)

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        out: list[Delivery] = []
        while not out and self._fatal is None and self._pid == os.getpid():
            left = max(0.0, deadline - time.monotonic())
            taken = self._buffer.take(max_count, left, lambda: self._generation)
            for delivery in taken:
                if self._current(delivery) is None:
                    continue  # that connection is gone; the broker redelivers the message
                reason = cast(_Tag, delivery.tag).malformed
                if reason is None:
                    out.append(delivery)
                else:
                    self._dead_letter_malformed(delivery, reason)
            if not taken or time.monotonic() >= deadline:
                break
        if not out:
            self._check()
        return out

    def _dead_letter_malformed(self, delivery: Delivery, reason: str) -> None:
        self.malformed += 1
        log.warning(
            "kew: STOMP frame %s on %r is not kew's wire format; dead-lettering it: %s",
            delivery.message.id,
            self._queue,
            reason,
        )
        try:
            self.dead_letter(delivery, reason)
        except Exception as e:  # the broker refused the dead letter: have it redelivered
            self.errors += 1
            self._dead_letter_faults += 1
            log.exception("kew: cannot dead-letter a malformed frame on %r", self._queue)
            link = self._current(delivery)
            if link is not None:
                link.close()  # the connection thread reconnects; the broker redelivers
            if self._dead_letter_faults >= self.MAX_FAULTS:
                self._fail("the broker refuses the dead letters of malformed frames", e)
            return
        self._dead_letter_faults = 0

    def _current(self, delivery: Delivery) -> _Link | None:
        """The link a delivery came on, if it is still the live one."""
        generation = cast(_Tag, delivery.tag).generation
        link = self._link
        if link is None or not link.usable() or generation != self._generation:
            return None  # that connection is gone; the broker redelivers the message
        return link

    def _claim(self, delivery: Delivery) -> bool:
        """True the first time a delivery is settled; False after."""
        tag = cast(_Tag, delivery.tag)
        with self._settle_lock:
            if tag.settled:
                return False
            tag.settled = True
            return True

    def _ack(self, link: _Link, delivery: Delivery) -> None:
        with contextlib.suppress(_Lost):
            link.frame(link.conn.ack, cast(_Tag, delivery.tag).ack_id)

    def ack(self, delivery: Delivery) -> None:
        if not self._claim(delivery):
            return  # settled already: a second ACK frame would be an error on the broker
        link = self._current(delivery)
        if link is not None:
            self._ack(link, delivery)

    def _move(self, delivery: Delivery, dest: str, extra: dict[str, str | int]) -> None:
        """Send a receipted copy of the delivery to ``dest``, then ack it."""
        if not self._claim(delivery):
            return
        link = self._current(delivery)
        if link is None:
            return
        m = delivery.message
        copy = Message(m.id, m.body, m.headers, durable=True)
        try:
            headers = send_headers(self._c.dialect, copy, extra, now=now_ms())
            with self._send_lock:
                rid = link.new_receipt()
                link.send(dest, m.body, headers, rid)
            link.wait([rid], self._c.options.receipt_timeout)
        except _Lost:
            return  # not acked: redelivered, and may be dead-lettered again
        except BaseException:
            cast(_Tag, delivery.tag).settled = False  # not settled: the caller may try again
            raise
        self._ack(link, delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        extra: dict[str, str | int] = {
            H_DEAD_REASON: reason,
            H_DEAD_COUNT: delivery.delivery_count,
            H_DEAD_AT: now_ms(),
        }
        self._move(delivery, self._c.dest(f"{self._queue}.dead"), extra)

    def release(self, delivery: Delivery) -> None:
        headers = cast(_Tag, delivery.tag).headers
        extra: dict[str, str | int] = {H_REDELIVERIES: delivery_count(headers)}
        self._move(delivery, self._dest, extra)

    def close(self) -> None:
        self._closed.set()
        link = self._link
        if link is not None and link.usable():
            with link._cond:  # wake the connection thread now
                link._cond.notify_all()
        self._thread.join(10)
        link = self._link
        if link is not None:
            link.close()
        self._buffer.drop()


# -- browser (kew_artemis._browser: StompBrowser) ------------------------------


# -- helpers (frames: kew_artemis._frames; one connection: kew_artemis._link) --


def connect(url: str) -> StompConnector:
    return StompConnector(url)
