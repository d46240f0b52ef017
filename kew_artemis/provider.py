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

Connections are kew's own: stomp.py's reconnect is off (it races, stomp.py
#114/#308/#351).  Each producer, consumer and the connector hold one
connection; a lost one is dropped and a new one made (failover list in URL
order, exponential backoff, ``retries`` rounds); a consumer's own thread
resubscribes, and deliveries of the lost connection are never settled (the
broker redelivers them).  Heartbeats both ways.

Every MESSAGE frame is read on its own (``kew_artemis._frames.read_frame``,
through :mod:`kew.qchan.spi.wire`): kew's int headers are read as integers
(decimal text, with or without ``kew-ints``); a frame kew cannot read (a
``kew-ints`` that is not a JSON array of names, a listed or kew int header
that is not decimal text, a ``kew-id`` that is not an id, headers that are
not UTF-8) is dead-lettered at once by ``fetch`` with the reason, keeping
its body; a frame without ``kew-id`` has the broker's ``message-id``.
Nothing a frame holds stops the receiver thread (kew splits the frames
itself: ``_link._FrameReader``); an unexpected error there drops the
connection, and repeated errors of the consumer's thread end in
``ConsumerFailed`` from ``fetch``.  Settling a delivery twice does nothing.

URL options: see ``kew_artemis._frames.Options``.
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import cast

from kew.qchan.spi import (
    BrokerUnavailable,
    Capability,
    ConsumerFailed,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    SendError,
    now_ms,
)
from kew.qchan.spi.wire import H_DEAD_AT, H_DEAD_COUNT, H_DEAD_REASON, Malformed
from kew_artemis._frames import (
    DIALECTS,
    H_ID,
    H_INTS,
    H_REDELIVERIES,
    SCHEMES,
    Options,
    _from_frame,
    _int,
    delivery_count,
    destination,
    read_frame,
    salvage_frame,
    send_frame,
    send_headers,
    subscribe_headers,
)
from kew_artemis._link import _Link, _Lost

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
    "connect",
    "destination",
    "read_frame",
    "send_frame",
    "send_headers",
    "subscribe_headers",
]

log = logging.getLogger("kew.stomp")


# -- connector -------------------------------------------------------------


class StompConnector:
    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted
        self.max_message_size = self.options.max_message_size
        self.dialect = self.options.dialect
        self.lacks: dict[Capability, str] = {}
        if self.dialect != "activemq":
            self.lacks[Capability.BROWSE] = (
                f"STOMP has no browse on {self.dialect}; reading without taking would "
                "mark messages redelivered"
            )
        self._lock = threading.Lock()
        self._link: _Link | None = None

    def __repr__(self) -> str:
        return f"StompConnector({self.url!r})"

    def dest(self, queue: str) -> str:
        return destination(self.dialect, queue)

    def link(self) -> _Link:
        if self._link is None or self._link.lost is not None:
            if self._link is not None:
                self._link.close()
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

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()
            self._link = None


# -- producer --------------------------------------------------------------


class StompProducer:
    def __init__(self, connector: StompConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._lock = threading.Lock()
        self._link: _Link | None = None

    def _frames(self, messages: Sequence[Message]) -> list[tuple[str, bytes, dict[str, str]]]:
        now = now_ms()
        g = self._c.options.delay_granularity
        out = []
        for m in messages:
            if len(m.body) > self._c.max_message_size:
                raise MessageTooLarge(len(m.body), self._c.max_message_size, self._queue)
            dest, headers = send_frame(self._c.dialect, self._queue, m, now=now, granularity=g)
            out.append((dest, m.body, headers))
        return out

    def _send(self, frames: list[tuple[str, bytes, dict[str, str]]]) -> None:
        o = self._c.options
        with self._lock:
            for attempt in (1, 2, 3):
                try:
                    if self._link is None or self._link.lost is not None:
                        if self._link is not None:
                            self._link.close()
                        self._link = _Link(o, self._c.url).open()
                    link = self._link
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
    id, the frame's headers, and whether it was settled (a second ack,
    dead letter or release of it does nothing)."""

    generation: int
    ack_id: str
    headers: dict[str, str]
    settled: bool = field(default=False)


#: What the connection thread hands to ``fetch``: a delivery and, for a
#: frame that is not kew's wire format, the reason to dead-letter it with.
#: ``None`` only wakes ``fetch`` to say the consumer failed.
_Item = tuple[Delivery, str | None] | None


class StompConsumer:
    #: Unexpected errors in a row (connection thread, dead-lettering a
    #: malformed frame) after which the consumer fails for good.
    MAX_FAULTS = 5

    def __init__(self, connector: StompConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._dest = connector.dest(queue)
        self._prefetch = prefetch
        self._buffer: queue_mod.Queue[_Item] = queue_mod.Queue()
        self._generation = 0
        self._link: _Link | None = None
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
        self._thread = threading.Thread(target=self._run, name=f"kew-stomp-{queue}", daemon=True)
        self._thread.start()
        self._ready.wait(120)
        if self._failed is not None or not self._ready.is_set():
            self._closed.set()
            raise BrokerUnavailable(
                f"cannot consume from {queue!r} at {connector.url}: {self._failed}"
            )

    # kew's connection state machine: connect, subscribe, wait for a loss, again.
    def _run(self) -> None:
        delay: float | None = 0.1
        faults = 0
        try:
            while delay is not None and not self._closed.is_set():
                try:
                    delay = self._session(delay)
                    faults = 0
                except Exception as e:
                    self.errors += 1
                    faults += 1
                    log.exception("kew: the STOMP consumer of %r failed; reconnecting", self._queue)
                    if not self._ready.is_set():
                        self._failed = e
                        self._ready.set()
                        return
                    if faults >= self.MAX_FAULTS:
                        raise
                    self._drop_link()
                    self._closed.wait(0.1 * 2**faults)
                    delay = 0.1
        except BaseException as e:
            self._fail(f"its connection thread stopped after {faults} errors in a row", e)
            if not isinstance(e, Exception):
                raise

    def _session(self, delay: float) -> float | None:
        """One connection: connect, subscribe, wait until it is lost.  The
        next backoff delay, or None to stop (closed, or refused at start)."""
        try:
            link = _Link(self._c.options, self._c.url, self._on_message).open()
        except BrokerUnavailable as e:
            if not self._ready.is_set():
                self._failed = e
                self._ready.set()
                return None
            self._closed.wait(delay)
            return min(delay * 2, 2.0)
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
                self._ready.set()
                return None
            self._closed.wait(delay)
            return min(delay * 2, 2.0)
        self._ready.set()
        with link._cond:
            while link.lost is None and not self._closed.is_set():
                link._cond.wait(0.2)
        if self._closed.is_set():
            return None
        # lost: the broker hands back whatever that connection held
        self.reconnects += 1
        self._drop_link()
        self._closed.wait(0.1)
        return 0.1

    def _drop_link(self) -> None:
        link = self._link
        self._drop_buffer()
        if link is not None:
            link.close()

    def _fail(self, why: str, cause: BaseException | None = None) -> None:
        """The consumer can never deliver again: ``fetch`` raises it."""
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        self._fatal = ConsumerFailed(
            f"the STOMP consumer of {self._queue!r} at {self._c.url} failed: {why}{detail}"
        )
        log.error("kew: %s", self._fatal)
        self._buffer.put(None)  # wake fetch

    def _on_message(self, link: _Link, headers: dict[str, str], body: bytes) -> None:
        """stomp.py's receiver thread: every frame becomes a delivery, or a
        malformed one that ``fetch`` dead-letters at once."""
        tag = _Tag(link.generation, headers.get("ack") or headers.get("message-id", ""), headers)
        try:
            message, count = read_frame(headers, body)
            self._buffer.put((Delivery(message, count, tag), None))
            return
        except Malformed as e:
            reason = str(e)
        except Exception as e:  # a fault of kew's own: that frame is dead-lettered, the rest flow
            self.errors += 1
            log.exception("kew: cannot read a STOMP frame on %r", self._queue)
            reason = str(Malformed(f"kew could not read the frame ({type(e).__name__}: {e})"))
        try:
            kept = salvage_frame(headers, body)
        except Exception:
            self.errors += 1
            log.exception("kew: cannot salvage a STOMP frame on %r", self._queue)
            kept = Message(f"stomp-{link.new_receipt()}", body, {})
        self._buffer.put((Delivery(kept, delivery_count(headers), tag), reason))

    def _drop_buffer(self) -> None:
        while True:
            try:
                item = self._buffer.get_nowait()
            except queue_mod.Empty:
                return
            if item is None:  # keep the wake-up of a failure
                self._buffer.put(None)
                return

    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if not self._thread.is_alive() and not self._closed.is_set() and self._ready.is_set():
            self._fail("its connection thread is gone")
            raise cast(ConsumerFailed, self._fatal)

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        out: list[Delivery] = []
        while len(out) < max_count:
            if self._fatal is not None:
                break
            try:
                if out:
                    item = self._buffer.get_nowait()
                else:
                    item = self._buffer.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                break
            if item is None:
                continue
            delivery, reason = item
            if self._current(delivery) is None:
                continue  # that connection is gone; the broker redelivers the message
            if reason is None:
                out.append(delivery)
            else:
                self._dead_letter_malformed(delivery, reason)
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
        if link is None or link.lost is not None or generation != self._generation:
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
        if link is not None:
            with link._cond:  # wake the connection thread now
                link._cond.notify_all()
        self._thread.join(10)
        link = self._link
        if link is not None:
            link.close()
        self._drop_buffer()


class StompBrowser:
    """STOMP has no browse.  ActiveMQ has one (a ``browser:true``
    subscription that ends with a ``browser:end`` message): peek, stats and
    dead-letter listings use it.  Elsewhere messages are taken without an
    ack and handed back by closing the connection (they keep their place
    but are marked redelivered), and a listing ends when no message comes
    for ``browse_idle`` seconds."""

    def __init__(self, connector: StompConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._dead = f"{queue}.dead"

    def _browse(self, queue: str, limit: int) -> list[tuple[dict[str, str], bytes]]:
        """Read up to ``limit`` messages of ``queue`` without removing any."""
        got: list[tuple[dict[str, str], bytes]] = []
        if limit <= 0:
            return got
        end = threading.Event()
        dialect = self._c.dialect

        def on_message(_: _Link, headers: dict[str, str], body: bytes) -> None:
            if dialect == "activemq" and headers.get("browser") == "end":
                end.set()
                return
            if len(got) < limit:
                got.append((headers, body))
            if len(got) >= limit:
                end.set()

        link = _Link(self._c.options, self._c.url, on_message).open()
        try:
            if dialect == "activemq":
                headers = {"browser": "true", "activemq.prefetchSize": "1000"}
                link.frame(link.conn.subscribe, self._c.dest(queue), id="browse", ack="auto",
                           headers=headers)  # fmt: skip
                deadline = time.monotonic() + 60
                while not end.wait(0.1):
                    link.check()
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(f"browsing {queue!r} at {self._c.url} timed out")
            else:
                headers = subscribe_headers(dialect, limit, self._c.options.window_bytes)
                if dialect == "artemis":
                    headers["consumer-window-size"] = "-1"
                link.frame(link.conn.subscribe, self._c.dest(queue), id="browse",
                           ack="client-individual", headers=headers)  # fmt: skip
                self._until_idle(link, lambda: len(got), end)
        except _Lost as e:
            raise BrokerUnavailable(f"browsing {queue!r} at {self._c.url}: {e}") from None
        finally:
            link.close()  # unacked: handed back
        return got

    def _until_idle(self, link: _Link, count: Callable[[], int], end: threading.Event) -> None:
        idle = self._c.options.browse_idle
        seen, last = -1, time.monotonic()
        while not end.is_set():
            link.check()
            n = count()
            if n != seen:
                seen, last = n, time.monotonic()
            elif time.monotonic() - last > idle:
                return
            end.wait(0.02)

    def _take(
        self, queue: str, keep: Callable[[dict[str, str]], bool], on_take: Callable[..., None]
    ) -> int:
        """Consume ``queue``; for each message ``keep`` accepts, call
        ``on_take(link, headers, body)`` then ack it; hand the rest back."""
        dialect = self._c.dialect
        expected = -1
        if dialect == "activemq":
            expected = len(self._browse(queue, 1_000_000))
            if expected == 0:
                return 0
        pending: queue_mod.Queue[tuple[dict[str, str], bytes]] = queue_mod.Queue()
        link = _Link(self._c.options, self._c.url, lambda _, h, b: pending.put((h, b))).open()
        taken = seen = 0
        try:
            headers = subscribe_headers(dialect, 1000, self._c.options.window_bytes)
            if dialect == "artemis":
                headers["consumer-window-size"] = "-1"
            link.frame(link.conn.subscribe, self._c.dest(queue), id="take",
                       ack="client-individual", headers=headers)  # fmt: skip
            idle = self._c.options.browse_idle
            while expected < 0 or seen < expected:
                try:
                    h, body = pending.get(timeout=idle if expected < 0 else max(idle, 5.0))
                except queue_mod.Empty:
                    break
                seen += 1
                if keep(h):
                    on_take(link, h, body)
                    link.frame(link.conn.ack, h.get("ack") or h.get("message-id", ""))
                    taken += 1
            rid = link.new_receipt()  # every ack reached the broker
            link.frame(link.conn.unsubscribe, "take", headers={"receipt": rid})
            link.wait([rid], self._c.options.receipt_timeout)
        except _Lost as e:
            raise BrokerUnavailable(f"draining {queue!r} at {self._c.url}: {e}") from None
        finally:
            link.close()
        return taken

    def peek(self, limit: int) -> Sequence[Message]:
        return [_from_frame(h, b)[0] for h, b in self._browse(self._queue, limit)]

    def _count(self, queue: str) -> int:
        return len(self._browse(queue, 1_000_000))

    def stats(self) -> QueueStats:
        return QueueStats(self._count(self._queue), -1, -1, self._count(self._dead))

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return [
            DeadLetter(
                _from_frame(h, b)[0],
                _int(h.get(H_DEAD_COUNT), 1),
                h.get(H_DEAD_REASON, ""),
                _int(h.get(H_DEAD_AT)),
            )
            for h, b in self._browse(self._dead, limit)
        ]

    def _wanted(self, ids: Collection[str] | None) -> Callable[[dict[str, str]], bool]:
        chosen = None if ids is None else set(ids)
        return lambda h: chosen is None or (h.get(H_ID) or h.get("message-id")) in chosen

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        dest = self._c.dest(self._queue)

        def requeue(link: _Link, headers: dict[str, str], body: bytes) -> None:
            m, _ = _from_frame(headers, body)
            rid = link.new_receipt()
            wire = send_headers(self._c.dialect, Message(m.id, body, m.headers), now=now_ms())
            link.send(dest, body, wire, rid)
            link.wait([rid], self._c.options.receipt_timeout)

        return self._take(self._dead, self._wanted(ids), requeue)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return self._take(self._dead, self._wanted(ids), lambda *_: None)

    def purge(self) -> int:
        return self._take(self._queue, lambda _: True, lambda *_: None)

    def close(self) -> None:
        pass


def connect(url: str) -> StompConnector:
    return StompConnector(url)
