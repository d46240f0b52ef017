"""``amqp://`` and ``amqps://``: queues on RabbitMQ, with pika.

Durable queues (classic, or quorum with ``queue_type=quorum``), persistent
messages, publisher confirms.  ``send_many`` writes the whole batch on a
confirm-mode channel without waiting, then waits once for all its confirms
(``batch=pipeline``, the default), or publishes it in one AMQP transaction
(``batch=tx``: commit-ok once every message is stored).  Either way a batch
costs one round trip and returns only when every message is stored.

pika is not thread-safe, so every connection here has one owner: a producer
guards its connection with a lock; a consumer runs its connection on its own
I/O thread.  Acks and requeues from handler threads are queued for it (one
``add_callback_threadsafe`` wake-up for all queued) and do not wait; a dead
letter waits for its confirm.  That thread keeps heartbeats going however
long a handler runs.  A message whose envelope kew cannot read (another
program's: see kew.qchan.spi.wire) is dead-lettered by that thread at once
with the reason; an unexpected error there is logged and recovered from by
reconnecting, and too many, a refused login or a deleted queue make
``fetch`` raise ConsumerFailed.  See docs/providers/rabbitmq.md.

Delayed delivery needs no plugin: a message due in d ms goes to the queue
``<q>.delay.<D>`` where D is d rounded *up* to ``delay_granularity`` ms;
that queue has ``x-message-ttl=D`` and dead-letters expired messages into
``<q>``, and expires itself when unused.  Every message in a delay queue has
the same TTL, so they expire in order, and never early.

Options: ``queue_type`` (classic|quorum), ``heartbeat`` (s, default 30),
``retries`` (reconnects before BrokerUnavailable, default 10),
``connection_name`` (shown by the management tools, default ``kew``),
``delay_granularity`` (ms, default 100), ``max_message_size`` (bytes,
default 64 MiB), ``batch`` (pipeline|tx), ``ca_certs``, ``certfile``,
``keyfile`` (amqps://).
The URL path is the virtual host.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import queue as queue_mod
import ssl
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pika
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    AMQPError,
    AuthenticationError,
    ChannelClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from kew.qchan.spi import (
    BrokerUnavailable,
    Capability,
    ConfigError,
    ConsumerFailed,
    DeadLetter,
    Delivery,
    Headers,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    SendError,
    now_ms,
)
from kew.qchan.spi.wire import (
    H_CONTENT_TYPE,
    H_DEAD_AT,
    H_DEAD_COUNT,
    H_DEAD_REASON,
    Malformed,
    check_id,
    header_value,
    headers_from_mapping,
    salvage,
)

SCHEMES = ("amqp", "amqps")
R = TypeVar("R")

# Dead-letter headers (next to the message's own, on messages in <q>.dead).
_DEAD_HEADERS = (H_DEAD_REASON, H_DEAD_COUNT, H_DEAD_AT)

log = logging.getLogger("kew.consumer")


# -- options ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    params: list[pika.ConnectionParameters]
    queue_type: str
    retries: int
    delay_granularity: int
    max_message_size: int
    batch: str

    @classmethod
    def from_url(cls, url: str) -> Options:
        p = ProviderURL.parse(url, SCHEMES)
        tls = p.scheme == "amqps"
        files = {k: v for k in ("ca_certs", "certfile", "keyfile") if (v := p.get_str(k))}
        if files and not tls:
            raise ConfigError(f"TLS files need an amqps:// URL: {p.redacted!r}")
        ssl_options = None
        if tls:
            context = ssl.create_default_context(cafile=files.get("ca_certs"))
            if "certfile" in files:
                context.load_cert_chain(files["certfile"], files.get("keyfile"))
            ssl_options = pika.SSLOptions(context)
        heartbeat = p.get_int("heartbeat", 30)
        connection_name = p.get_str("connection_name", "kew") or "kew"
        credentials = pika.PlainCredentials(p.username or "guest", p.password or "guest")
        params = [
            pika.ConnectionParameters(
                host=host or "127.0.0.1",
                port=port or (5671 if tls else 5672),
                virtual_host=p.path or "/",
                credentials=credentials,
                heartbeat=heartbeat,
                ssl_options=ssl_options,
                blocked_connection_timeout=60,
                connection_attempts=1,
                client_properties={"connection_name": connection_name},
            )
            for host, port in (p.hosts or [("127.0.0.1", None)])
        ]
        options = cls(
            params=params,
            queue_type=p.get_choice("queue_type", "classic", ("classic", "quorum")),
            retries=p.get_int("retries", 10),
            delay_granularity=p.get_int("delay_granularity", 100, minimum=1),
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
            batch=p.get_choice("batch", "pipeline", ("pipeline", "tx")),
        )
        p.finish()
        return options


class _Refused(BrokerUnavailable):
    """The broker refuses these credentials or this virtual host: trying
    again does not help."""


def _refused(e: AMQPConnectionError) -> bool:
    if isinstance(e, AuthenticationError):  # no common SASL mechanism
        return True
    if isinstance(e, ProbableAuthenticationError | ProbableAccessDeniedError):
        # pika guesses from the stage the connection ended at: only the
        # broker's own refusal counts, not a connection lost meanwhile
        return "ACCESS_REFUSED" in str(e) or "NOT_ALLOWED" in str(e)
    return False


def _connect(options: Options, url: str) -> pika.BlockingConnection:
    """A connection, retried with backoff; BrokerUnavailable when spent,
    at once (``_Refused``) when the broker refuses the login or vhost."""
    delay = 0.1
    for attempt in range(options.retries + 1):
        try:
            return pika.BlockingConnection(options.params)
        except ssl.SSLError as e:
            # a certificate or protocol mismatch does not heal by retrying;
            # and there is no falling back to plain text
            hint = ""
            if isinstance(e, ssl.SSLCertVerificationError):
                hint = " (the server's certificate is not trusted: check ca_certs)"
            raise BrokerUnavailable(
                f"TLS handshake with RabbitMQ at {url} failed{hint}: {e}"
            ) from None
        except AMQPConnectionError as e:
            if _refused(e):
                raise _Refused(f"RabbitMQ at {url} refused the connection: {e!r}") from None
            if attempt == options.retries:
                raise BrokerUnavailable(f"RabbitMQ at {url} is unreachable: {e!r}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def _properties(m: Message) -> pika.BasicProperties:
    # the content type in AMQP's property too, for other programs; none if
    # the message has none (read back, the property becomes the header)
    content_type = m.headers.get(H_CONTENT_TYPE)
    if not isinstance(content_type, str) or len(content_type.encode()) > 255:
        content_type = None  # not a short string: in the headers only
    return pika.BasicProperties(
        message_id=m.id,
        headers=dict(m.headers),
        delivery_mode=2 if m.durable else 1,
        content_type=content_type,
    )


# -- reading what another program wrote -------------------------------------
#
# Anything an AMQP client can put in a message's properties reaches these
# functions; none of them raises for it.  A message kew cannot read (see
# kew.qchan.spi.wire) is dead-lettered by the consumer with the reason, as
# much of it kept as can be; the browser lists, requeues and purges such
# messages like any other.


def _own_headers(props: Any) -> dict[Any, object]:
    """The message's header table without the broker's own headers (names
    starting ``x-``: ``x-death``, ``x-delivery-count``, ...)."""
    table = props.headers
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if not (isinstance(k, str) and k.startswith("x-"))}


def _message(props: Any, body: bytes) -> Message:
    """The message, or :class:`Malformed` saying what kew cannot read.
    kew's dead-letter headers are not part of it (the browser reads them)."""
    mid = check_id(props.message_id)
    headers = headers_from_mapping(_own_headers(props), skip=_DEAD_HEADERS)
    if props.content_type is not None:  # AMQP's own property, for a foreign producer
        headers[H_CONTENT_TYPE] = header_value(H_CONTENT_TYPE, props.content_type)
    return Message(mid, body, _plain(headers, strict=True))


def _plain(headers: Headers, strict: bool) -> dict[str, str | int]:
    """Integers as ints (pika decodes them as its own ``long(int)``), and
    only those AMQP can carry: an integer beyond 64 bits comes from an AMQP
    double, which pika reads as an integer; kew could not write it back.
    ``strict``: Malformed for one, else it is left out."""
    out: dict[str, str | int] = {}
    for name, value in headers.items():
        if isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                if strict:
                    raise Malformed(
                        f"header {name!r} holds a number beyond the 64-bit integers of AMQP "
                        f"({str(value)[:30]}...); kew header values are text or integers"
                    )
                continue
            value = int(value)
        out[name] = value
    return out


def _read(props: Any, body: bytes) -> tuple[Message, str]:
    """``(message, "")``; or, for a message kew cannot read, what can be
    kept of it and why (``malformed envelope: ...``)."""
    try:
        return _message(props, body), ""
    except Malformed as e:
        why = str(e)
    except Exception as e:  # a bug of kew's: that one message goes, not the consumer
        log.exception("kew: cannot read a message's envelope")
        why = str(Malformed(f"kew cannot read it ({type(e).__name__}: {e})"))
    headers = {k: v for k, v in _own_headers(props).items() if k not in _DEAD_HEADERS}
    if props.content_type is not None:
        headers[H_CONTENT_TYPE] = props.content_type
    kept = salvage(props.message_id, body, headers, fallback_id=_fallback_id(props, body))
    return Message(kept.id, kept.body, _plain(kept.headers, strict=False)), why


def _fallback_id(props: Any, body: bytes) -> str:
    """An id for a message without a usable one: a digest of what its
    producer wrote (not of what the broker adds), so that every reading of
    it gives the same id: a listing, then a requeue by that id."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((props.message_id, props.content_type, _own_headers(props))).encode())
    digest.update(body)
    return digest.hexdigest()


def _delivery_count(props: Any, redelivered: bool, quorum: bool) -> int:
    """1 for a first delivery; on a redelivery the quorum queue's
    ``x-delivery-count`` + 1, else 2.  The header is read only where the
    broker sets it (quorum queues, redeliveries): one that a producer wrote
    (copied from another message, or not a number) says nothing."""
    if not redelivered:
        return 1
    table = props.headers
    count = table.get("x-delivery-count") if quorum and isinstance(table, dict) else None
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return count + 1
    return 2


def _int_or(value: object, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


# A content header frame: 8 bytes of frame, 12 of class, weight and body size,
# then the properties.  The broker closes a connection that sends a frame over
# its frame_max; a dead letter that did that would come back for ever.
_FRAME_OVERHEAD = 20


def _header_size(name: str, value: str | int) -> int:
    """What one header costs in an AMQP table (pika's encoding)."""
    return 1 + len(name.encode()) + (9 if isinstance(value, int) else 5 + len(value.encode()))


def _fit(m: Message, frame_max: int) -> Message:
    """The dead letter ``m``, made to fit one AMQP frame: its largest headers
    left out, then its reason cut, the reason saying so."""
    size = len(b"".join(_properties(m).encode())) + _FRAME_OVERHEAD
    if size <= frame_max:
        return m
    headers = dict(m.headers)
    reason = str(headers.pop(H_DEAD_REASON, ""))
    size -= _header_size(H_DEAD_REASON, reason)
    left_out: list[str] = []
    room = frame_max - 1024  # for the reason
    # the largest first, the content type last
    for name in sorted(headers, key=lambda k: (k == H_CONTENT_TYPE, -_header_size(k, headers[k]))):
        if size <= room:
            break
        if name not in _DEAD_HEADERS:
            size -= _header_size(name, headers.pop(name))
            left_out.append(name)
    note = f" [left out to fit one AMQP frame: headers {', '.join(left_out)}"[:300] + "]"
    cut = max(0, frame_max - size - len(note.encode()) - _header_size(H_DEAD_REASON, "") - 64)
    headers[H_DEAD_REASON] = reason.encode()[:cut].decode(errors="ignore") + note
    return Message(m.id, m.body, headers, m.durable, m.deliver_at)


def _tag(delivery: Delivery) -> tuple[int, int]:
    """(connection generation, AMQP delivery tag): a tag of a lost
    connection is no longer settled (the broker requeued the message)."""
    return cast(tuple[int, int], delivery.tag)


# A delay queue expires ``bucket + DELAY_EXPIRES`` ms after it was last
# declared (publishing does not count as use): redeclared when the last
# declare is older than half that, so a message sent to it always expires
# (into its target) before the queue does.
DELAY_EXPIRES = 60_000


def _delay_route(options: Options, queue: str, m: Message) -> tuple[str, dict[str, Any] | None]:
    """(queue to publish to, its declare arguments if a delay queue)."""
    if m.deliver_at is None:
        return queue, None
    delay = m.deliver_at - now_ms()
    if delay <= 0:
        return queue, None
    g = options.delay_granularity
    bucket = -(-delay // g) * g  # rounded up: never early
    args = {
        "x-message-ttl": bucket,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-expires": bucket + DELAY_EXPIRES,
    }
    return f"{queue}.delay.{bucket}", args


def _due_declare(declared: dict[str, float], name: str) -> bool:
    """Whether ``name`` needs declaring now (and note it as declared)."""
    now = time.monotonic()
    if now - declared.get(name, -1e9) < DELAY_EXPIRES / 2000:
        return False
    declared[name] = now
    return True


# -- connector -------------------------------------------------------------


class RabbitConnector:
    lacks: dict[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted
        self.max_message_size = self.options.max_message_size
        if self.options.queue_type == "quorum":
            self.lacks = {
                Capability.BROWSE: "peeking takes messages and hands them back; a quorum "
                "queue puts them behind the others and counts that as a delivery"
            }
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None

    def __repr__(self) -> str:
        return f"RabbitConnector({self.url!r})"

    def run(self, fn: Callable[[Any], R]) -> R:
        """Run ``fn(channel)`` on the connector's own connection, reconnecting once."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None or not self._conn.is_open:
                        self._conn = _connect(self.options, self.url)
                        self._channel = None
                    if self._channel is None or not self._channel.is_open:
                        self._channel = self._conn.channel()
                    return fn(self._channel)
                except AMQPChannelError:
                    self._channel = None
                    raise
                except AMQPConnectionError:
                    self._conn = None
                    if attempt == 2:
                        raise BrokerUnavailable(f"RabbitMQ at {self.url} is unreachable") from None
            raise AssertionError("unreachable")

    def queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": self.options.queue_type}

    def declare(self, queue: str) -> None:
        args = self.queue_arguments()

        def declare(ch: Any) -> None:
            ch.queue_declare(queue, durable=True, arguments=args)
            ch.queue_declare(f"{queue}.dead", durable=True, arguments=args)

        self.run(declare)

    def producer(self, queue: str) -> RabbitProducer:
        return RabbitProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> RabbitConsumer:
        return RabbitConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> RabbitBrowser:
        return RabbitBrowser(self, queue)

    def delete(self, queue: str) -> None:
        def delete(ch: Any) -> None:
            ch.queue_delete(queue)
            ch.queue_delete(f"{queue}.dead")

        self.run(delete)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn.is_open:
                with contextlib.suppress(AMQPError):
                    self._conn.close()
            self._conn = None


# -- producer --------------------------------------------------------------


class RabbitProducer:
    def __init__(self, connector: RabbitConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._confirm: Any = None  # a channel in confirm mode, for send
        self._tx: Any = None  # a channel in transaction mode, for send_many
        self._pipe: Pipeline | None = None  # or one with pipelined confirms
        self._delay_queues: dict[str, float] = {}  # delay queue -> declared at

    def _channels(self) -> tuple[Any, Any]:
        if self._conn is None or not self._conn.is_open:
            self._conn = _connect(self._c.options, self._c.url)
            self._confirm = self._tx = self._pipe = None
            self._delay_queues.clear()
        if self._confirm is None or not self._confirm.is_open:
            self._confirm = self._conn.channel()
            self._confirm.confirm_delivery()
        return self._confirm, self._conn

    def _batch_channel(self) -> Any:
        assert self._conn is not None
        if self._c.options.batch == "tx":
            if self._tx is None or not self._tx.is_open:
                self._tx = self._conn.channel()
                self._tx.tx_select()
            return self._tx
        if self._pipe is None or not self._pipe.channel.is_open:
            self._pipe = Pipeline(self._conn)
        return self._pipe

    def _route(self, ch: Any, m: Message) -> str:
        """The queue to publish to: the target, or a delay queue feeding it."""
        if len(m.body) > self._c.max_message_size:
            raise MessageTooLarge(len(m.body), self._c.max_message_size, self._queue)
        route, args = _delay_route(self._c.options, self._queue, m)
        if args is not None and _due_declare(self._delay_queues, route):
            ch.queue_declare(route, durable=True, arguments=args)
        return route

    def _with_retry(self, fn: Callable[[Any, Any], None]) -> None:
        # fn(confirm channel, connection)
        with self._lock:
            for attempt in (1, 2):
                try:
                    fn(*self._channels())
                    return
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as e:
                    raise SendError(
                        f"RabbitMQ refused a message for {self._queue!r}: {e!r}"
                    ) from None
                except (AMQPConnectionError, AMQPChannelError) as e:
                    if self._conn is not None and self._conn.is_open:
                        with contextlib.suppress(Exception):
                            self._conn.close()
                    self._conn = None  # reconnect and send again: at-least-once
                    if attempt == 2:
                        raise BrokerUnavailable(
                            f"sending to {self._queue!r} at {self._c.url} failed: {e!r}"
                        ) from None

    def send(self, message: Message) -> None:
        def publish(confirm: Any, _conn: Any) -> None:
            route = self._route(confirm, message)
            confirm.basic_publish("", route, message.body, _properties(message), mandatory=True)

        self._with_retry(publish)

    def send_many(self, messages: Sequence[Message]) -> None:
        def publish(confirm: Any, _conn: Any) -> None:
            routes = [self._route(confirm, m) for m in messages]  # all checked first
            batch = self._batch_channel()
            if isinstance(batch, Pipeline):
                batch.publish(self._queue, list(zip(routes, messages, strict=True)))
                return
            for route, m in zip(routes, messages, strict=True):
                batch._impl.basic_publish("", route, m.body, _properties(m))  # buffered
            _coalesce(self._conn)
            batch.tx_commit()  # one round trip: commit-ok once all are stored

        self._with_retry(publish)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn.is_open:
                with contextlib.suppress(AMQPError):
                    self._conn.close()
            self._conn = None


class Pipeline:
    """A confirm-mode channel whose publishes do not wait one by one: a
    batch is written in one go, then its confirms are awaited together
    (the broker confirms a persistent message once it is stored).
    BlockingChannel waits for each confirm, so this drives the channel
    underneath it; the producer's lock makes it single-threaded."""

    TIMEOUT = 120.0

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self.conn = conn
        self.channel = conn.channel()
        self._impl = self.channel._impl
        self._seq = 0  # delivery tags given so far on this channel
        self._waiting: set[int] = set()
        self._nacked: list[int] = []
        self._returned: list[str] = []
        ready: list[bool] = []
        self._impl.add_on_return_callback(self._on_return)

        def on_ready(_: Any) -> None:
            ready.append(True)
            self._wake()

        self._impl.confirm_delivery(self._on_confirm, callback=on_ready)
        self._wait(lambda: bool(ready))

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        done = {t for t in self._waiting if t <= m.delivery_tag} if m.multiple else {m.delivery_tag}
        if isinstance(m, pika.spec.Basic.Nack):
            self._nacked += sorted(done & self._waiting)
        self._waiting -= done
        if not self._waiting:
            self._wake()

    def _wake(self) -> None:
        # process_data_events returns early only for its own events: post one
        self.conn.add_callback_threadsafe(_nothing)

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        self._returned.append(f"{props.message_id} ({method.reply_text})")

    def _wait(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                raise AMQPConnectionError("no publisher confirms in time")
            self.conn.process_data_events(time_limit=1)

    def publish(self, queue: str, batch: Sequence[tuple[str, Message]]) -> None:
        self._nacked, self._returned = [], []
        for route, m in batch:
            self._impl.basic_publish("", route, m.body, _properties(m), mandatory=True)
            self._seq += 1
            self._waiting.add(self._seq)
        _coalesce(self.conn)
        self._wait(lambda: not self._waiting)
        if self._nacked or self._returned:
            raise SendError(
                f"RabbitMQ refused {len(self._nacked) + len(self._returned)} of "
                f"{len(batch)} messages for {queue!r}: "
                f"{', '.join(self._returned) or 'nacked'}"
            )


def _nothing() -> None:
    pass


def _coalesce(conn: pika.BlockingConnection) -> None:
    """One socket write for a batch: pika writes every frame (three per
    message, one per ack) with its own send(), and on loopback each send()
    costs the sender the receiver's TCP work too; join what is buffered.  An
    optimisation only: without pika's internals as expected, nothing
    changes."""
    buffers = getattr(
        getattr(getattr(conn, "_impl", None), "_transport", None), "_tx_buffers", None
    )
    if buffers is not None and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)


# -- consumer --------------------------------------------------------------


# Acks and requeues are plain frames on the consumer's channel: they take
# effect when the broker reads them, nobody waits.  A settle with messages to
# send (and a dead letter) publishes them on a second, confirm-mode channel
# of the same connection and acks its deliveries once the broker has
# confirmed every one of them (stored: a persistent message in a durable
# queue).  Many settles may wait for confirms at once, so their round trips
# overlap.  Not an AMQP transaction: RabbitMQ refuses any frame on a channel
# while its tx.commit runs, so an ack written during a commit closed the
# connection, and commits cannot overlap.  A crash between confirm and ack
# delivers the message again: the same guarantee as send-then-ack.  Frames go
# through the BlockingChannels' underlying channels: they are buffered, and
# the I/O loop writes every frame of one flush at once.
def _ack(ch: Any, tag: int) -> None:
    ch._impl.basic_ack(tag)


def _requeue(ch: Any, tag: int) -> None:
    ch._impl.basic_nack(tag, requeue=True)


# An op for the I/O thread: (connection generation, fn(channel)).
_Op = tuple[int, Callable[[Any], None]]

Done = Callable[[BaseException | None], None]


class _Settle:
    """A settle waiting for its publisher confirms (I/O thread state)."""

    __slots__ = ("done", "error", "finished", "ids", "pending", "tags")

    def __init__(self, tags: list[int], ids: list[str], done: Done) -> None:
        self.tags = tags
        self.ids = ids
        self.pending = len(ids)
        self.error = ""
        self.done = done
        self.finished = False

    def finish(self, error: str, url: str, queue: str) -> None:
        """Once: record the outcome and call back."""
        if self.finished:
            return
        self.finished = True
        self.error = self.error or error
        try:
            self.done(_settle_error(url, queue, self.error) if self.error else None)
        except Exception:
            log.exception("kew: a settle callback failed")


def _settle_error(url: str, queue: str, why: str) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"settling on {queue!r} at {url}: {why}; what was not acked is delivered again"
    )


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

    def __init__(self, connector: RabbitConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._prefetch = prefetch
        self._quorum = connector.options.queue_type == "quorum"
        # deliveries; None wakes a fetch to tell it the consumer failed
        self._buffer: queue_mod.Queue[Delivery | None] = queue_mod.Queue()
        self._generation = 0
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._failure: tuple[str, BaseException | None] | None = None  # for good
        self._ops_lock = threading.Lock()
        self._ops: list[_Op] = []  # for the I/O thread
        self._held: set[int] = set()  # delivery tags of this generation not settled
        self._flush_scheduled = False
        self._open: set[_Settle] = set()  # settles not finished (under _ops_lock)
        # I/O thread only, per connection:
        self._pub: Any = None  # the confirm-mode channel (its BlockingChannel)
        self._seq = 0  # messages published on it so far
        self._unconfirmed: collections.deque[tuple[int, _Settle]] = collections.deque()
        self._returned: set[str] = set()  # ids of messages the broker could not route
        self._delay_queues: dict[str, float] = {}
        self._cancelled = False  # by the broker
        self._frame_max = 131_072  # negotiated with the broker when connected
        self.reconnects = 0
        self.unexpected_errors = 0  # on the I/O thread, each logged with its traceback
        self._thread = threading.Thread(target=self._run_io, name=f"kew-amqp-{queue}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise BrokerUnavailable(f"cannot consume from {queue!r} at {connector.url}")
        self._check()  # refused at once: the login, or no such queue

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
        delay = 0.1
        unexpected: collections.deque[float] = collections.deque()
        refused_since: float | None = None
        while not self._closed.is_set():
            try:
                conn = self._subscribe()
                refused_since = None
                self._ready.set()
                delay = 0.1
                while not self._closed.is_set():
                    conn.process_data_events(time_limit=0.2)
                    if self._cancelled:
                        raise _Cancelled()
                with contextlib.suppress(AMQPError):
                    self._flush_ops()  # acks queued while closing
                    deadline = time.monotonic() + 10
                    while self._unconfirmed and time.monotonic() < deadline:
                        conn.process_data_events(time_limit=0.2)
                    conn.close()
                self._fail_open("the consumer was closed first")
                return
            except _Refused as e:  # the login or the vhost: retrying does not help
                self._fail(str(e), e)
                return
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
            except (AMQPError, BrokerUnavailable, OSError):
                pass  # the connection was lost: reconnect
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
            self._closed.wait(delay)
            delay = min(delay * 2, 2.0)

    def _subscribe(self) -> pika.BlockingConnection:
        """Connect, open the consumer's and the confirm channel, consume."""
        conn = _connect(self._c.options, self._c.url)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self._prefetch)
            pub = self._confirm_channel(conn)
            self._fail_open("the connection was lost")  # their ops are void
            with self._ops_lock:  # ops of the lost connection are void
                self._ops, self._flush_scheduled = [], False
                self._held.clear()
                self._generation += 1
                self._conn, self._channel = conn, ch
            self._pub, self._seq = pub, 0
            self._returned.clear()
            self._delay_queues.clear()
            self._cancelled = False
            self._frame_max = int(getattr(conn._impl.params, "frame_max", 0)) or 131_072
            ch.add_on_cancel_callback(self._on_cancel)
            try:
                ch.basic_consume(self._queue, self._on_message)
            except ChannelClosedByBroker as e:
                if e.reply_code not in (403, 404):
                    raise
                raise _NotConsumable(
                    f"cannot consume from {self._queue!r}: ({e.reply_code}) {e.reply_text}"
                ) from e
        except BaseException:
            if conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()
            raise
        return conn

    def _on_cancel(self, _frame: Any) -> None:
        self._cancelled = True  # the I/O loop subscribes again

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        # callbacks come only for the current connection
        tag = (self._generation, method.delivery_tag)
        with self._ops_lock:
            self._held.add(method.delivery_tag)
        count = _delivery_count(props, method.redelivered, self._quorum)
        message, why = _read(props, body)
        delivery = Delivery(message, count, tag)
        if why:
            self._dead_letter_soon(delivery, why)
        else:
            self._buffer.put(delivery)

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
            sends = [self._dead_send(delivery, reason)]
        except Exception as e:  # a bug of kew's: keep the body and the reason
            log.exception("kew: cannot write message %s's headers", mid)
            bare = Delivery(
                Message(mid, delivery.message.body), delivery.delivery_count, delivery.tag
            )
            sends = [self._dead_send(bare, f"{reason} [headers left out: {e!r}]"[:10_000])]
        self._send_then_ack([delivery], sends, done, held_only=True)

    def _lose(self, why: str) -> None:
        """The connection is gone (or is given up): close it, fail what waited
        on it; the broker requeues what it held."""
        lost = self._conn
        if lost is not None and lost.is_open:  # e.g. only the channel failed
            with contextlib.suppress(Exception):
                lost.close()
        self._unconfirmed.clear()
        self._fail_open(why)
        self._drop_buffer()

    def _fail(self, why: str, cause: BaseException | None) -> None:
        """For good: fetch raises ConsumerFailed from now on."""
        self._failure = (f"the consumer of {self._queue!r} at {self._c.url} failed: {why}", cause)
        log.error("kew: %s", self._failure[0])
        self._lose(why)
        with self._ops_lock:
            self._ops, self._flush_scheduled = [], False
            self._held.clear()
            self._generation += 1
            self._conn = None
        self._buffer.put(None)  # wakes a waiting fetch
        self._ready.set()

    def _check(self) -> None:
        failure = self._failure
        if failure is None and not self._thread.is_alive() and not self._closed.is_set():
            failure = (f"the I/O thread of the consumer of {self._queue!r} has ended", None)
        if failure is not None:
            raise ConsumerFailed(failure[0]) from failure[1]

    def _confirm_channel(self, conn: pika.BlockingConnection) -> Any:
        """A channel in confirm mode whose confirms and returns come to
        ``_on_confirm`` / ``_on_return`` on this thread."""
        pub = conn.channel()
        ready: list[bool] = []
        pub._impl.add_on_return_callback(self._on_return)
        pub._impl.confirm_delivery(self._on_confirm, callback=lambda _: ready.append(True))
        deadline = time.monotonic() + 30
        while not ready:
            if time.monotonic() > deadline:
                raise AMQPConnectionError("no confirm.select-ok in time")
            conn.process_data_events(time_limit=0.2)
        return pub

    def _drop_buffer(self) -> None:
        # the broker requeues whatever the lost connection held
        while True:
            try:
                self._buffer.get_nowait()
            except queue_mod.Empty:
                return

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        self._check()
        out: list[Delivery] = []
        try:
            got = self._buffer.get(timeout=timeout)
            while True:
                if got is not None:
                    out.append(got)
                if len(out) >= max_count:
                    break
                got = self._buffer.get_nowait()
        except queue_mod.Empty:
            pass
        self._check()
        return [d for d in out if _tag(d)[0] == self._generation]

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
        for, or None if the connection is gone."""
        conn = self._conn
        if conn is None or not conn.is_open:
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
            _coalesce(self._conn)  # one send() for them all, not one per frame

    # -- publish, then ack on confirm (I/O thread) --

    def _publish(self, entry: _Settle, sends: Sequence[tuple[str, Message]]) -> None:
        pub = self._pub._impl
        for queue, m in sends:
            route, args = _delay_route(self._c.options, queue, m)
            if args is not None and _due_declare(self._delay_queues, route):
                pub.queue_declare(route, durable=True, arguments=args)  # nowait
            pub.basic_publish("", route, m.body, _properties(m), mandatory=True)
            self._seq += 1
            self._unconfirmed.append((self._seq, entry))

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        refused = isinstance(m, pika.spec.Basic.Nack)
        confirmed = self._unconfirmed
        if m.multiple:
            while confirmed and confirmed[0][0] <= m.delivery_tag:
                self._confirmed(confirmed.popleft()[1], refused)
        else:
            for i, (seq, entry) in enumerate(confirmed):
                if seq == m.delivery_tag:
                    del confirmed[i]
                    self._confirmed(entry, refused)
                    break
        if self._conn is not None:
            _coalesce(self._conn)

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        # a basic.return comes before the message's confirm
        self._returned.add(f"{props.message_id} to {method.routing_key!r} ({method.reply_text})")

    def _confirmed(self, entry: _Settle, refused: bool) -> None:
        if refused:
            entry.error = "the broker refused (nacked) a message"
        entry.pending -= 1
        if entry.pending:
            return
        returned = [r for r in self._returned if r.split(" ", 1)[0] in entry.ids]
        if returned:
            self._returned.difference_update(returned)
            entry.error = f"no queue for {', '.join(returned)}"
        ch = self._channel
        for tag in entry.tags:  # stored: ack; else delivered again
            if entry.error:
                _requeue(ch, tag)
            else:
                _ack(ch, tag)
        self._finish(entry, "")

    def _finish(self, entry: _Settle, error: str) -> None:
        with self._ops_lock:
            self._open.discard(entry)
        entry.finish(error, self._c.url, self._queue)

    def _fail_open(self, why: str) -> None:
        """Every settle not finished fails (its deliveries come again)."""
        with self._ops_lock:
            entries, self._open = list(self._open), set()
        for entry in entries:
            entry.finish(why, self._c.url, self._queue)

    def _release_soon(self, delivery: Delivery, op: Callable[[Any, int], None]) -> None:
        """Ack or requeue: queued for the I/O thread, not waited for (if the
        connection drops first, the broker requeues the message anyway)."""
        with self._ops_lock:  # atomic with a reconnect's reset
            tags = self._take([delivery])
            if tags:
                self._schedule(lambda ch: op(ch, tags[0]))

    def ack(self, delivery: Delivery) -> None:
        self._release_soon(delivery, _ack)

    def release(self, delivery: Delivery) -> None:
        self._release_soon(delivery, _requeue)

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
                entry = _Settle(tags, [m.id for _, m in sends], done)
                lost = self._schedule(lambda _ch: self._publish(entry, sends)) is None
                if not lost:
                    self._open.add(entry)
        if lost is None:
            done(None)
        elif lost:
            done(_settle_error(self._c.url, self._queue, "the connection is lost"))

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
            raise _settle_error(self._c.url, self._queue, "no publisher confirm in time")
        if outcome[0] is not None:
            raise outcome[0]

    def _dead_send(self, delivery: Delivery, reason: str) -> tuple[str, Message]:
        m = delivery.message
        headers = {
            **m.headers,
            H_DEAD_REASON: reason,
            H_DEAD_COUNT: delivery.delivery_count,
            H_DEAD_AT: now_ms(),
        }
        return f"{self._queue}.dead", _fit(Message(m.id, m.body, headers), self._frame_max)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        sends = [self._dead_send(delivery, reason)]
        with contextlib.suppress(BrokerUnavailable):  # not acked: delivered again
            self._wait(lambda done: self._send_then_ack([delivery], sends, done, held_only=True))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(10)
        self._drop_buffer()


# -- browser ---------------------------------------------------------------


class RabbitBrowser:
    """Browsing takes messages with basic.get and hands them back (requeue):
    they keep their place, but are marked redelivered."""

    def __init__(self, connector: RabbitConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._dead = f"{queue}.dead"

    def _count(self, ch: Any, queue: str) -> int:
        return int(ch.queue_declare(queue, passive=True).method.message_count)

    def _handed_back(self, ch: Any, queue: str, expected: int, timeout: float = 5.0) -> None:
        """Wait (bounded) until messages a closed channel handed back are
        counted again: a quorum queue requeues them through its Raft log, so
        a listing or a count right after would miss them.  Consumers may take
        some meanwhile, so this waits at most ``timeout`` and never fails."""
        deadline = time.monotonic() + timeout
        while self._count(ch, queue) < expected and time.monotonic() < deadline:
            time.sleep(0.01)

    def _take(self, ch: Any, queue: str, limit: int) -> list[tuple[Any, Any, bytes]]:
        got: list[tuple[Any, Any, bytes]] = []
        while len(got) < limit:
            method, props, body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            got.append((method, props, body))
        return got

    def peek(self, limit: int) -> Sequence[Message]:
        def peek(conn_ch: Any) -> list[Message]:
            before = self._count(conn_ch, self._queue)
            ch = conn_ch.connection.channel()
            try:
                return [_read(p, b)[0] for _, p, b in self._take(ch, self._queue, limit)]
            finally:
                ch.close()  # unacked: requeued in place
                self._handed_back(conn_ch, self._queue, before, timeout=1.0)

        return self._c.run(peek)

    def stats(self) -> QueueStats:
        def stats(ch: Any) -> QueueStats:
            q = ch.queue_declare(self._queue, passive=True).method
            d = ch.queue_declare(self._dead, passive=True).method
            return QueueStats(q.message_count, -1, -1, d.message_count)

        return self._c.run(stats)

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        def dead(conn_ch: Any) -> list[DeadLetter]:
            before = self._count(conn_ch, self._dead)
            ch = conn_ch.connection.channel()
            try:
                letters = [_dead_letter(p, b) for _, p, b in self._take(ch, self._dead, limit)]
            finally:
                ch.close()
                self._handed_back(conn_ch, self._dead, before)
            # oldest first: a quorum queue puts what an earlier listing
            # handed back behind later dead letters (stable for equal times)
            return sorted(letters, key=lambda d: d.dead_at)

        return self._c.run(dead)

    def _drain_dead(self, ids: Collection[str] | None, requeue: bool) -> int:
        def drain(conn_ch: Any) -> int:
            before = self._count(conn_ch, self._dead)
            ch = conn_ch.connection.channel()
            ch.confirm_delivery()
            n = 0
            try:
                for method, props, body in self._take(ch, self._dead, 1_000_000):
                    m = _read(props, body)[0]
                    if ids is not None and m.id not in ids:
                        continue  # handed back when the channel closes
                    if requeue:
                        ch.basic_publish("", self._queue, body, _properties(m))
                    ch.basic_ack(method.delivery_tag)
                    n += 1
            finally:
                ch.close()
                self._handed_back(conn_ch, self._dead, before - n)
            return n

        return self._c.run(drain)

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return self._drain_dead(ids, requeue=True)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return self._drain_dead(ids, requeue=False)

    def purge(self) -> int:
        return int(self._c.run(lambda ch: ch.queue_purge(self._queue).method.message_count))

    def close(self) -> None:
        pass


def _dead_letter(props: Any, body: bytes) -> DeadLetter:
    """A message of ``<q>.dead`` as a dead letter, whoever wrote it: what
    cannot be read is left out (a count of 1, a time of 0, the problem as
    the reason when there is none)."""
    message, why = _read(props, body)
    table = props.headers if isinstance(props.headers, dict) else {}
    try:
        reason = str(header_value(H_DEAD_REASON, table.get(H_DEAD_REASON, why)))
    except Malformed as e:
        reason = why or str(e)
    count = _int_or(table.get(H_DEAD_COUNT), 1)
    return DeadLetter(message, count, reason, _int_or(table.get(H_DEAD_AT), 0))


def connect(url: str) -> RabbitConnector:
    return RabbitConnector(url)
