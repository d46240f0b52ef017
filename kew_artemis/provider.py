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

Options: ``dialect`` (artemis|activemq|rabbitmq), ``heartbeat`` (ms,
default 10000, 0 off), ``retries`` (connection rounds before
BrokerUnavailable, default 10), ``receipt_timeout`` (s, default 30),
``connect_timeout`` (s, default 10: TCP connect, TLS handshake, CONNECTED),
``window_bytes`` (Artemis: consumer-window-size per prefetched message,
default 1, so at most ``prefetch`` messages are in flight; raise it to about
the message size for throughput), ``batch`` (how ``send_many`` stores a
batch: ``pipeline`` = every SEND receipted, all receipts awaited together;
``tx`` = the SENDs inside a STOMP transaction whose one receipted COMMIT
stores the whole batch (a SEND in a transaction is only stored at COMMIT,
so its own receipt would promise nothing); ``auto``, the default, is ``tx``
on ActiveMQ, which stores plain receipted SENDs one at a time, and
``pipeline`` elsewhere), ``delay_granularity`` (ms, default 100: RabbitMQ's
delay queues round a delay up to this), ``browse_idle`` (s, default 0.3: how long a drain
waits for one more message where the broker cannot say the queue is
empty), ``max_message_size`` (bytes, default 64 MiB), ``vhost`` (the
CONNECT host header; default the host name, ``/`` on RabbitMQ),
``ca_certs``, ``certfile``, ``keyfile`` (stomp+ssl).
Login and passcode come from the URL's user info.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import queue as queue_mod
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import stomp
from stomp.exception import StompException

from kew.qchan.spi import (
    BrokerUnavailable,
    Capability,
    ConfigError,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    SendError,
    now_ms,
)

SCHEMES = ("stomp", "stomp+ssl")
DIALECTS = ("artemis", "activemq", "rabbitmq")

# kew's own STOMP headers.
H_ID = "kew-id"
H_INTS = "kew-ints"  # JSON list of the header names whose values are ints
H_REDELIVERIES = "kew-redeliveries"  # releases by kew (a copy is sent, then acked)
H_REASON, H_COUNT, H_DEAD_AT = "kew-dead-reason", "kew-dead-count", "kew-dead-at"
ESCAPE = "kew-h-"  # prefix for an application header whose name STOMP or a broker owns

#: Header names a STOMP frame or one of the brokers gives a meaning of its own.
RESERVED = frozenset(
    {
        "ack", "content-length", "destination", "expires", "host", "id", "login",
        "message", "message-id", "passcode", "persistent", "priority", "receipt",
        "receipt-id", "redelivered", "reply-to", "subscription", "timestamp",
        "transaction", "type", "version", "heart-beat", "correlation-id", "browser",
        "destination-type", "subscription-type", "consumer-window-size", "selector",
        "original-destination",
    }
)  # fmt: skip
#: Prefixes of headers brokers add or interpret (dropped on the way in, escaped on the way out).
BROKER_PREFIXES = ("amq_", "_amq", "jms", "activemq.", "x-", "__amq", "nms")


# -- options ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    hosts: list[tuple[str, int]]
    tls: bool
    ca_certs: str | None
    certfile: str | None
    keyfile: str | None
    login: str | None
    passcode: str | None
    vhost: str | None
    dialect: str
    heartbeat: int
    retries: int
    receipt_timeout: float
    connect_timeout: float
    window_bytes: int
    batch: str
    delay_granularity: int
    browse_idle: float
    max_message_size: int

    @classmethod
    def from_url(cls, url: str) -> Options:
        p = ProviderURL.parse(url, SCHEMES)
        tls = p.scheme == "stomp+ssl"
        files = {k: p.get_str(k) for k in ("ca_certs", "certfile", "keyfile")}
        if any(files.values()) and not tls:
            raise ConfigError(f"TLS files need a stomp+ssl:// URL: {p.redacted!r}")
        if files["keyfile"] and not files["certfile"]:
            raise ConfigError(f"keyfile without certfile in {p.redacted!r}")
        options = cls(
            hosts=[(h or "127.0.0.1", port or 61613) for h, port in p.hosts]
            or [("127.0.0.1", 61613)],
            tls=tls,
            ca_certs=files["ca_certs"],
            certfile=files["certfile"],
            keyfile=files["keyfile"],
            login=p.username,
            passcode=p.password,
            vhost=p.get_str("vhost"),
            dialect=p.get_choice("dialect", "artemis", DIALECTS),
            heartbeat=p.get_int("heartbeat", 10_000),
            retries=p.get_int("retries", 10),
            receipt_timeout=p.get_float("receipt_timeout", 30.0, minimum=0.1),
            connect_timeout=p.get_float("connect_timeout", 10.0, minimum=0.1),
            window_bytes=p.get_int("window_bytes", 1, minimum=1),
            batch=p.get_choice("batch", "auto", ("auto", "pipeline", "tx")),
            delay_granularity=p.get_int("delay_granularity", 100, minimum=1),
            browse_idle=p.get_float("browse_idle", 0.3, minimum=0.01),
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
        )
        p.finish()
        if options.batch == "auto":  # ActiveMQ syncs its journal per plain SEND
            batch = "tx" if options.dialect == "activemq" else "pipeline"
            options = dataclasses.replace(options, batch=batch)
        return options


# -- frames (pure: what kew puts on the wire, per dialect) -----------------


def destination(dialect: str, queue: str) -> str:
    """The STOMP destination of ``queue``: Artemis addresses the queue by
    name (anycast headers say it is a queue); the others use ``/queue/``."""
    return queue if dialect == "artemis" else f"/queue/{queue}"


#: kew's wire-format headers that travel under their own names.
PLAIN_KEW = frozenset({"kew-type", "kew-sent-at", "kew-deliver-at", "kew-count"})


def _wire_name(name: str) -> str:
    """A header's name on the wire: ``kew-h-<name>`` where STOMP, a broker
    or kew's STOMP provider itself owns the name."""
    lowered = name.lower()
    if lowered in RESERVED or lowered.startswith(BROKER_PREFIXES):
        return ESCAPE + name
    if lowered.startswith("kew-") and name not in PLAIN_KEW:
        return ESCAPE + name
    return name


def send_headers(
    dialect: str, message: Message, extra: Mapping[str, str | int] | None = None, *, now: int
) -> dict[str, str]:
    """The SEND frame's headers for ``message`` (without destination/receipt).

    Application headers keep their names (escaped with ``kew-h-`` where STOMP
    or a broker owns the name); int values travel as decimal text, listed
    in ``kew-ints`` so they come back as ints.  ``extra`` are kew's own
    headers (dead-letter reason ...), written as they are.
    """
    h: dict[str, str] = {H_ID: message.id, "persistent": "true" if message.durable else "false"}
    ints: list[str] = []
    for k, v in message.headers.items():
        if k == "content-type":
            h[k] = str(v)
            continue
        name = _wire_name(k)
        if isinstance(v, int) and not isinstance(v, bool):
            ints.append(name)
        h[name] = str(v)
    for k, v in (extra or {}).items():
        h[k] = str(v)
    if ints:
        h[H_INTS] = json.dumps(ints, separators=(",", ":"))
    if dialect == "artemis":
        h["destination-type"] = "ANYCAST"
    if message.deliver_at is not None and message.deliver_at > now:
        if dialect == "artemis":
            h["AMQ_SCHEDULED_TIME"] = str(message.deliver_at)
        elif dialect == "activemq":
            h["AMQ_SCHEDULED_DELAY"] = str(message.deliver_at - now)
        else:
            raise SendError(
                "RabbitMQ's STOMP plugin cannot schedule a message: route it with "
                "send_frame, which uses a TTL delay queue (kew never delivers one early)"
            )
    return h


def send_frame(
    dialect: str,
    queue: str,
    message: Message,
    *,
    now: int,
    granularity: int = 100,
    extra: Mapping[str, str | int] | None = None,
) -> tuple[str, dict[str, str]]:
    """(destination, headers) of the SEND frame that puts ``message`` on ``queue``.

    Artemis and ActiveMQ schedule with headers.  RabbitMQ has no scheduler:
    a message due in d ms goes to the durable queue ``<q>.delay.<D>`` (D = d
    rounded *up* to ``granularity``), declared by this very SEND with
    ``x-message-ttl=D`` and dead-lettering into ``<q>`` through the default
    exchange; the queue expires when unused.  Every message of a delay queue
    has the same TTL, so they expire in order, and never early.
    """
    due = message.deliver_at is not None and message.deliver_at > now
    if dialect != "rabbitmq" or not due or message.deliver_at is None:
        return destination(dialect, queue), send_headers(dialect, message, extra, now=now)
    delay = message.deliver_at - now
    bucket = -(-delay // granularity) * granularity
    headers = send_headers(dialect, dataclasses.replace(message, deliver_at=None), extra, now=now)
    headers.update(
        {
            "x-message-ttl": str(bucket),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
            "x-expires": str(bucket + 60_000),
        }
    )
    return destination(dialect, f"{queue}.delay.{bucket}"), headers


def subscribe_headers(dialect: str, prefetch: int, window_bytes: int = 1) -> dict[str, str]:
    """The SUBSCRIBE frame's extra headers: the prefetch bound per dialect."""
    if dialect == "artemis":
        return {
            "subscription-type": "ANYCAST",
            "consumer-window-size": str(max(1, prefetch * window_bytes)),
        }
    if dialect == "activemq":
        return {"activemq.prefetchSize": str(prefetch)}
    return {"prefetch-count": str(prefetch)}


def _from_frame(headers: Mapping[str, str], body: bytes) -> tuple[Message, int]:
    """(message, delivery count) from a MESSAGE frame."""
    try:  # a foreign or damaged header must not stop the consumer
        listed = json.loads(headers.get(H_INTS, "[]"))
        ints = {x for x in listed if isinstance(x, str)} if isinstance(listed, list) else set()
    except ValueError:
        ints = set()
    out: dict[str, str | int] = {}
    for k, v in headers.items():
        lowered = k.lower()
        if k.startswith("kew-") and not k.startswith(ESCAPE) and k not in PLAIN_KEW:
            continue
        if lowered in RESERVED or lowered.startswith(BROKER_PREFIXES):
            continue
        value: str | int = v
        if k in ints:
            with contextlib.suppress(ValueError):
                value = int(v)
        out[k[len(ESCAPE) :] if k.startswith(ESCAPE) else k] = value
    count = 1 + _int(headers.get(H_REDELIVERIES))
    if headers.get("redelivered", "false").lower() == "true":
        count += 1
    return Message(headers.get(H_ID) or headers.get("message-id", ""), body, out), count


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class _Tag:
    """A delivery's handle: the connection generation it came on, the ack id,
    and the frame's headers."""

    generation: int
    ack_id: str
    headers: dict[str, str]


# -- connections (kew's own state: one stomp.py connection, never reconnected by it)


class _Lost(Exception):
    """The connection went away (or the broker sent an ERROR)."""


class _Link(stomp.ConnectionListener):  # type: ignore[misc]
    """One STOMP connection: receipts awaited by id, MESSAGE frames to ``on_message``."""

    _ids = itertools.count(1)

    def __init__(
        self,
        options: Options,
        url: str,
        on_message: Callable[[_Link, dict[str, str], bytes], None] | None = None,
    ) -> None:
        self.options = options
        self.url = url
        self.on_message_cb = on_message
        self._cond = threading.Condition()
        self._done: set[str] = set()
        self._errors: dict[str, str] = {}
        self.lost: str | None = None
        self.conn: Any = None
        self.generation = -1  # set by a consumer: which of its connections this is

    # listener callbacks (stomp.py's receiver thread)
    def on_receipt(self, frame: Any) -> None:
        with self._cond:
            self._done.add(frame.headers.get("receipt-id", ""))
            self._cond.notify_all()

    def on_error(self, frame: Any) -> None:
        message = frame.headers.get("message", "")
        detail = _text(frame.body)[:300]
        if detail and detail not in message:
            message = f"{message}: {detail}" if message else detail
        with self._cond:
            rid = frame.headers.get("receipt-id")
            if rid:
                self._errors[rid] = message
            else:
                self.lost = f"broker error: {message}"
            self._cond.notify_all()

    def on_disconnected(self) -> None:
        self._lose("disconnected")

    def on_heartbeat_timeout(self) -> None:
        self._lose("heartbeat timeout")

    def on_message(self, frame: Any) -> None:
        if self.on_message_cb is not None:
            body = frame.body if isinstance(frame.body, bytes) else str(frame.body).encode()
            self.on_message_cb(self, dict(frame.headers), body)

    def _lose(self, why: str) -> None:
        with self._cond:
            if self.lost is None:
                self.lost = why
            self._cond.notify_all()

    # connecting
    def open(self) -> _Link:
        """Connect to the first host that answers, in rounds with backoff."""
        o = self.options
        delay, last = 0.1, ""
        for attempt in range(o.retries + 1):
            for host in o.hosts:
                try:
                    self._open_one(host)
                    return self
                except ConfigError:
                    raise
                except (StompException, OSError, _Lost) as e:
                    refused = (self.lost or "").startswith("broker error")
                    last = self._explain(host, e)
                    self._close_quietly()
                    if refused:  # an ERROR frame answered CONNECT: login, vhost ...
                        raise BrokerUnavailable(
                            f"STOMP broker at {self.url} refused the connection: {last}"
                        ) from None
                    if "certificate" in last.lower():
                        raise BrokerUnavailable(f"STOMP broker at {self.url}: {last}") from None
            if attempt < o.retries:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise BrokerUnavailable(f"STOMP broker at {self.url} is unreachable: {last}")

    def _open_one(self, host: tuple[str, int]) -> None:
        o = self.options
        self.lost = None
        conn = stomp.Connection12(
            host_and_ports=[host],
            reconnect_attempts_max=1,
            heartbeats=(o.heartbeat, o.heartbeat),
            auto_decode=False,
            keepalive=True,
            timeout=o.connect_timeout,
            vhost=o.vhost or ("/" if o.dialect == "rabbitmq" else host[0]),
            heart_beat_receive_scale=2.0,
        )
        if o.tls:
            conn.set_ssl(
                for_hosts=[host],
                ca_certs=o.ca_certs,
                cert_file=o.certfile,
                key_file=o.keyfile,
            )
        conn.set_listener("kew", self)
        self.conn = conn
        conn.connect(o.login, o.passcode, wait=True, headers={"client-id": _client_id()})
        if self.lost is not None or not conn.is_connected():
            raise _Lost(self.lost or "not connected")
        # stomp.py reads a socket timeout as a closed connection: the timeout
        # bounds connecting only; heartbeats watch the connection from now on.
        # No Nagle: a pipelined batch ends with a small frame that would
        # otherwise wait for the broker's delayed ACK (~40 ms a batch).
        transport = conn.transport
        if transport.socket is not None:
            with contextlib.suppress(OSError):
                transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.blocking:
                transport.socket.settimeout(None)

    def _explain(self, host: tuple[str, int], e: BaseException) -> str:
        """Why a connection failed; stomp.py hides TLS errors, so probe."""
        where = f"{host[0]}:{host[1]}"
        if self.lost and self.lost.startswith("broker error"):
            return f"{where}: {self.lost}"
        o = self.options
        if o.tls:
            try:
                context = ssl.create_default_context(cafile=o.ca_certs)
                if o.certfile:
                    context.load_cert_chain(o.certfile, o.keyfile)
                with (
                    socket.create_connection(host, timeout=o.connect_timeout) as raw,
                    context.wrap_socket(raw, server_hostname=host[0]),
                ):
                    pass
            except ssl.SSLError as tls_error:
                return f"{where}: TLS failed: {tls_error}"
            except OSError as os_error:
                return f"{where}: {os_error}"
        else:
            try:
                with socket.create_connection(host, timeout=o.connect_timeout):
                    pass
            except OSError as os_error:
                return f"{where}: {os_error}"
        detail = str(e) or self.lost or "no CONNECTED frame"
        return f"{where}: {type(e).__name__}: {detail}"

    def _close_quietly(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.remove_listener("kew")
            with contextlib.suppress(Exception):
                conn.disconnect()

    # frames
    def new_receipt(self) -> str:
        return f"kew-{next(self._ids)}"

    def check(self) -> None:
        if self.lost is not None or self.conn is None:
            raise _Lost(self.lost or "closed")

    def send(self, dest: str, body: bytes, headers: dict[str, str], receipt: str | None) -> None:
        self.check()
        if receipt is not None:
            headers = {**headers, "receipt": receipt}
        try:
            self.conn.send(dest, body, headers=headers)
        except (StompException, OSError) as e:
            self._lose(repr(e))
            raise _Lost(repr(e)) from None

    def frame(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.check()
        try:
            method(*args, **kwargs)
        except (StompException, OSError) as e:
            self._lose(repr(e))
            raise _Lost(repr(e)) from None

    def wait(self, receipts: Collection[str], timeout: float) -> None:
        """Wait for every receipt; raise SendError on a refusal, _Lost on a loss."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                failed = [r for r in receipts if r in self._errors]
                if failed:
                    reason = self._errors[failed[0]]
                    for r in receipts:
                        self._errors.pop(r, None)
                        self._done.discard(r)
                    raise SendError(f"the STOMP broker at {self.url} refused a frame: {reason}")
                if all(r in self._done for r in receipts):
                    self._done.difference_update(receipts)
                    return
                if self.lost is not None:
                    raise _Lost(self.lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.lost = "receipt timeout"
                    raise _Lost(f"no receipt within {timeout}s")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        conn = self.conn
        if conn is not None and self.lost is None:
            with contextlib.suppress(Exception):
                rid = self.new_receipt()
                conn.disconnect(receipt=rid)
        self._lose("closed")
        self._close_quietly()


def _client_id() -> str:
    return f"kew-{uuid.uuid4().hex[:12]}"


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace").strip()
    return str(body or "").strip()


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


class StompConsumer:
    def __init__(self, connector: StompConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._dest = connector.dest(queue)
        self._prefetch = prefetch
        self._buffer: queue_mod.Queue[Delivery] = queue_mod.Queue()
        self._generation = 0
        self._link: _Link | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._failed: BaseException | None = None
        self._send_lock = threading.Lock()
        self.reconnects = 0
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
        delay = 0.1
        while not self._closed.is_set():
            try:
                link = _Link(self._c.options, self._c.url, self._on_message).open()
            except BrokerUnavailable as e:
                if not self._ready.is_set():
                    self._failed = e
                    self._ready.set()
                    return
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._generation += 1
            generation = self._generation
            link.generation = generation
            self._link = link
            try:
                headers = subscribe_headers(
                    self._c.dialect, self._prefetch, self._c.options.window_bytes
                )
                rid = link.new_receipt()
                link.frame(
                    link.conn.subscribe,
                    self._dest,
                    id=f"sub-{generation}",
                    ack="client-individual",
                    headers={**headers, "receipt": rid},
                )
                link.wait([rid], self._c.options.receipt_timeout)
            except (_Lost, SendError) as e:
                refused = (link.lost or "").startswith("broker error")
                link.close()
                if not self._ready.is_set() and (isinstance(e, SendError) or refused):
                    self._failed = e  # the broker refused the subscription
                    self._ready.set()
                    return
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._ready.set()
            delay = 0.1
            with link._cond:
                while link.lost is None and not self._closed.is_set():
                    link._cond.wait(0.2)
            if self._closed.is_set():
                return
            # lost: the broker hands back whatever that connection held
            self.reconnects += 1
            self._drop_buffer()
            link.close()
            self._closed.wait(delay)

    def _on_message(self, link: _Link, headers: dict[str, str], body: bytes) -> None:
        generation = link.generation
        message, count = _from_frame(headers, body)
        ack_id = headers.get("ack") or headers.get("message-id", "")
        self._buffer.put(Delivery(message, count, _Tag(generation, ack_id, headers)))

    def _drop_buffer(self) -> None:
        while True:
            try:
                self._buffer.get_nowait()
            except queue_mod.Empty:
                return

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        out: list[Delivery] = []
        try:
            out.append(self._buffer.get(timeout=timeout))
            while len(out) < max_count:
                out.append(self._buffer.get_nowait())
        except queue_mod.Empty:
            pass
        return [d for d in out if self._current(d) is not None]

    def _current(self, delivery: Delivery) -> _Link | None:
        """The link a delivery came on, if it is still the live one."""
        generation = cast(_Tag, delivery.tag).generation
        link = self._link
        if link is None or link.lost is not None or generation != self._generation:
            return None  # that connection is gone; the broker redelivers the message
        return link

    def _ack(self, link: _Link, delivery: Delivery) -> None:
        with contextlib.suppress(_Lost):
            link.frame(link.conn.ack, cast(_Tag, delivery.tag).ack_id)

    def ack(self, delivery: Delivery) -> None:
        link = self._current(delivery)
        if link is not None:
            self._ack(link, delivery)

    def _move(self, delivery: Delivery, dest: str, extra: dict[str, str | int]) -> None:
        """Send a receipted copy of the delivery to ``dest``, then ack it."""
        link = self._current(delivery)
        if link is None:
            return
        m = delivery.message
        copy = Message(m.id, m.body, m.headers, durable=True)
        headers = send_headers(self._c.dialect, copy, extra, now=now_ms())
        try:
            with self._send_lock:
                rid = link.new_receipt()
                link.send(dest, m.body, headers, rid)
            link.wait([rid], self._c.options.receipt_timeout)
        except _Lost:
            return  # not acked: redelivered, and may be dead-lettered again
        self._ack(link, delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        extra: dict[str, str | int] = {
            H_REASON: reason,
            H_COUNT: delivery.delivery_count,
            H_DEAD_AT: now_ms(),
        }
        self._move(delivery, self._c.dest(f"{self._queue}.dead"), extra)

    def release(self, delivery: Delivery) -> None:
        headers = cast(_Tag, delivery.tag).headers
        already = _int(headers.get(H_REDELIVERIES))
        redelivered = headers.get("redelivered", "false").lower() == "true"
        extra: dict[str, str | int] = {H_REDELIVERIES: already + 1 + int(redelivered)}
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


# -- browser ---------------------------------------------------------------


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
                _int(h.get(H_COUNT), 1),
                h.get(H_REASON, ""),
                _int(h.get(H_DEAD_AT)),
            )
            for h, b in self._browse(self._dead, limit)
        ]

    def _wanted(self, ids: Collection[str] | None) -> Callable[[dict[str, str]], bool]:
        chosen = None if ids is None else set(ids)
        return lambda h: chosen is None or h.get(H_ID, h.get("message-id")) in chosen

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
