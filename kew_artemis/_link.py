"""One STOMP connection of kew's own (stomp.py's reconnect is off): receipts
awaited by id, ERROR frames turned into refusals or a loss, MESSAGE frames
handed to a callback that can never stop stomp.py's receiver thread.

Opening a connection raises kew's errors only:

=============================================  ===================================
what the server (or the network) did           raised
=============================================  ===================================
an ERROR frame about the login, passcode or    :class:`AccessRefused`, at once
virtual host (RabbitMQ ``Access refused``,
``Virtual host ... access denied``; ActiveMQ
``User name [...] or password is invalid``)
another ERROR frame answering CONNECT          :class:`BrokerUnavailable`, at once
bytes that do not start a STOMP frame (Redis,  :class:`BrokerUnavailable`, at once,
AMQP, HTTP, a TLS port)                        naming what it said
a certificate the CA does not sign, TLS to a   :class:`BrokerUnavailable`, at once
port without TLS
refused, reset, timed out, no CONNECTED        :class:`BrokerUnavailable` after
                                               ``retries`` rounds (:class:`Backoff`)
=============================================  ===================================

A connection belongs to the process that opened it: in a child made by
``os.fork`` it is dropped without a frame (the parent still uses the
socket) and the child opens its own (:func:`reset_in_child`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection
from typing import Any

import stomp
from stomp.exception import (
    ConnectFailedException,
    ConnectionClosedException,
    InterruptedException,
    StompException,
)
from stomp.utils import HEARTBEAT_FRAME, parse_frame

from kew.qchan.spi import AccessRefused, BrokerUnavailable, ConfigError, KewError, SendError
from kew.qchan.spi.kit import DELAY_EXPIRES, Backoff
from kew_artemis._frames import H_UNREADABLE
from kew_artemis._options import Options

log = logging.getLogger("kew.stomp")


_PREAMBLE_END = re.compile(rb"\n\n|\r\n\r\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*([0-9]+)\r?$", re.MULTILINE)
#: Bytes of an unfinished frame beyond its connection's max_message_size
#: after which the stream is taken as broken (the connection is dropped).
_HEADROOM = 16 << 20
#: What an ERROR frame answering CONNECT says when the broker refused the
#: login, the passcode or the virtual host (RabbitMQ, ActiveMQ, Artemis).
_REFUSAL = re.compile(
    r"(?i)access refused|access denied|not authori[sz]ed|password|passcode|credential"
    r"|authenticat|unable to validate user|security|login|virtual host|vhost"
)
#: The first bytes of servers of other protocols, and what they are.
_SPEAKERS = (
    (b"AMQP", "an AMQP server"),
    (b"-ERR", "a Redis server"),
    (b"-NOAUTH", "a Redis server"),
    (b"HTTP/", "an HTTP server"),
    (b"\x15\x03", "a TLS server: use stomp+ssl://"),
    (b"\x16\x03", "a TLS server: use stomp+ssl://"),
)


# -- which host of a failover list answered last ------------------------------------

#: Per failover list (the URL's hosts): the index of the host that last
#: answered.  Connections start there, so that after a failover new ones go
#: straight to the new master instead of first waiting for the old one
#: (refused, or connect_timeout when its machine is gone).
_ANSWERED: dict[tuple[tuple[str, int], ...], int] = {}


def _in_turn(hosts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The hosts in the URL's order, starting with the one that answered last."""
    first = _ANSWERED.get(tuple(hosts), 0) % len(hosts)
    return hosts[first:] + hosts[:first]


# -- one process's connections ---------------------------------------------------

_IN_CHILD: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_child(obj: Any) -> None:
    """Have ``obj._in_child()`` called in a child process made by
    ``os.fork`` (or ``multiprocessing`` with the fork start method), before
    the child does anything else: the child's one thread drops what the
    parent's threads held (connections, locks)."""
    _IN_CHILD.add(obj)


def _after_fork() -> None:
    for obj in list(_IN_CHILD):
        with contextlib.suppress(Exception):
            obj._in_child()


os.register_at_fork(after_in_child=_after_fork)


def _unreadable(head: bytes) -> str | None:
    """Why a frame's command and headers are not UTF-8 text, if they are not
    (stomp.py would put U+FFFD in their place and say nothing)."""
    try:
        head.decode()
        return None
    except UnicodeDecodeError:
        pass
    for line in head.split(b"\n")[1:]:
        try:
            line.decode()
        except UnicodeDecodeError:
            name = line.split(b":", 1)[0].decode("utf-8", "replace").strip()
            return (
                f"header {name[:60]!r} holds bytes that are not UTF-8; "
                "STOMP header names and values are UTF-8 text"
            )
    return "the frame's command is not UTF-8"


class _FrameReader:
    """Splits what a STOMP connection receives into frames by the protocol:
    the headers up to the blank line, then ``content-length`` bytes of body
    (or up to a NUL byte when there is none), then the NUL.

    It replaces stomp.py's reader (``BaseTransport.__read_frames``, called
    by its I/O loop; stomp.py 8.1 to 9.0), which ends a frame at the first
    NUL byte unless a content-length header came before it.  STOMP 1.2
    allows a NUL in a header value and both brokers hand it on, so one
    header of a foreign producer cut a MESSAGE in two: a head without its
    ``ack`` and ``message-id`` (it could never be acked: redelivered for
    ever) and a tail read as a frame of an unknown command.  Socket reads,
    TLS and closing are handled as stomp.py's ``__read`` does."""

    def __init__(self, link: _Link, transport: Any, limit: int) -> None:
        self._link = link
        self._t = transport
        self._limit = limit
        self._buf = bytearray()
        self._body = -1  # where the body of the frame being read starts; -1: in its headers
        self._end: int | None = None  # where it ends (by content-length), if known
        self._head = 0  # where its headers end
        self._scan = 0  # where to go on looking for the blank line or the NUL
        self._sniffed = False  # the server's first bytes were a STOMP frame's

    def __call__(self) -> None:
        t = self._t
        while t.running:
            try:
                try:
                    chunk = t.receive()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                except InterruptedException:
                    continue
            except Exception:
                chunk = b""
            if not chunk:
                if not t.blocking:
                    return  # TLS: nothing decrypted yet
                raise ConnectionClosedException()
            self._buf += chunk
            if not self._sniffed and not self._sniff():
                return
            try:
                got = self._frames()
            except Exception as e:  # never stop stomp.py's I/O thread
                self._link.errors += 1
                log.exception("kew: cannot read STOMP frames from %s; reconnecting", self._link.url)
                self._link._lose(f"unreadable frames: {type(e).__name__}: {e}")
                return
            if got and t.blocking:
                return

    def _sniff(self) -> bool:
        """Whether the server's first bytes may start a STOMP frame
        (CONNECTED or ERROR); if they cannot, the server speaks another
        protocol: the connection is lost, saying what it sent."""
        head = bytes(self._buf).lstrip(b"\r\n")
        line, eol, _ = head.partition(b"\n")
        line = line.rstrip(b"\r")
        commands = (b"CONNECTED", b"ERROR")
        if eol and line in commands:
            self._sniffed = True
        elif not eol and any(c.startswith(line) for c in commands):
            pass  # not enough yet
        else:
            self._link.foreign = line[:48] or head[:48]
            self._link._lose("the server does not speak STOMP")
            return False
        return True

    def _frames(self) -> bool:
        """Hand every complete frame in the buffer to stomp.py; True if any
        frame or heart-beat was."""
        buf, got = self._buf, False
        while True:
            if self._body < 0:
                n = 0
                while n < len(buf) and buf[n] in b"\r\n":  # EOLs between frames: heart-beats
                    n += 1
                if n:
                    del buf[:n]
                    self._scan = 0
                    self._t.process_frame(HEARTBEAT_FRAME, b"\n")
                    got = True
                blank = _PREAMBLE_END.search(buf, max(0, self._scan - 3))
                if blank is None:
                    self._scan = len(buf)
                    self._check_size()
                    return got
                length = _CONTENT_LENGTH.search(buf, 0, blank.start())
                self._head, self._body, self._scan = blank.start(), blank.end(), blank.end()
                self._end = self._body + int(length.group(1)) if length else None
            if self._end is not None:
                end = self._end
                if len(buf) <= end:
                    self._check_size()
                    return got
                if buf[end] != 0:
                    raise ValueError(f"no NUL after the content-length of a frame ({end} bytes)")
            else:
                end = buf.find(b"\x00", self._scan)
                if end < 0:
                    self._scan = len(buf)
                    self._check_size()
                    return got
            raw = bytes(buf[:end])
            del buf[: end + 1]
            self._body, self._end, self._scan = -1, None, 0
            frame = parse_frame(raw)
            if frame is not None:
                unreadable = _unreadable(raw[: self._head])
                if unreadable:
                    frame.headers[H_UNREADABLE] = unreadable
                self._t.process_frame(frame, raw)
                got = True

    def _check_size(self) -> None:
        if len(self._buf) > self._limit:
            raise ValueError(f"a frame of more than {self._limit} bytes")


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
        self.pid = os.getpid()  # the process whose connection it is
        self.generation = -1  # set by a consumer: which of its connections this is
        self.errors = 0  # unexpected errors on the receiver thread (each drops the connection)
        self._connected = False  # a CONNECTED frame came
        self.refused: str | None = None  # the ERROR frame that answered CONNECT
        self.foreign: bytes | None = None  # the first bytes of a server that is not STOMP
        #: RabbitMQ delay queues declared on this connection, when (see the producer)
        self.declared: dict[str, float] = {}
        reset_in_child(self)

    # listener callbacks (stomp.py's receiver thread)
    def on_connected(self, frame: Any) -> None:
        with self._cond:
            self._connected = True
            self._cond.notify_all()

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
                if not self._connected:
                    self.refused = message
                self.lost = f"broker error: {message}"
            self._cond.notify_all()

    def on_disconnected(self) -> None:
        self._lose("disconnected")

    def on_heartbeat_timeout(self) -> None:
        self._lose("heartbeat timeout")

    def on_message(self, frame: Any) -> None:
        # stomp.py's receiver thread: an exception escaping here would end
        # its I/O loop with a bare warning and leave the connection silent.
        if self.on_message_cb is None:
            return
        try:
            body = frame.body if isinstance(frame.body, bytes) else str(frame.body).encode()
            self.on_message_cb(self, dict(frame.headers), body)
        except Exception as e:
            self.errors += 1
            log.exception("kew: STOMP MESSAGE frame not handled on %s; reconnecting", self.url)
            self._lose(f"a MESSAGE frame was not handled: {type(e).__name__}: {e}")

    def _lose(self, why: str) -> None:
        with self._cond:
            if self.lost is None:
                self.lost = why
            self._cond.notify_all()

    # connecting
    def open(self) -> _Link:
        """Connect to the first host that answers, in rounds with backoff;
        kew's errors only (see the module's table).  Each round tries the
        URL's hosts in order, starting with the one that answered last (a
        failover list: the new master, after a failover)."""
        o = self.options
        backoff, started, last = Backoff(), time.monotonic(), ""
        for attempt in range(o.retries + 1):
            for host in _in_turn(o.hosts):
                tried = time.monotonic()
                try:
                    self._open_one(host)
                    _ANSWERED[tuple(o.hosts)] = o.hosts.index(host)
                    return self
                except ConfigError:
                    raise
                except (StompException, OSError, _Lost) as e:
                    last, final = self._explain(host, e, time.monotonic() - tried)
                    self._close_quietly()
                    if final is not None:
                        raise final from None
            if attempt < o.retries:
                backoff.wait()
        took = time.monotonic() - started
        raise BrokerUnavailable(
            f"STOMP broker at {self.url} is unreachable: {last} "
            f"({o.retries + 1} round(s) over {len(o.hosts)} host(s) in {took:.1f} s)"
        )

    def _open_one(self, host: tuple[str, int]) -> None:
        o = self.options
        self.lost = self.refused = self.foreign = None
        conn = stomp.Connection12(
            host_and_ports=[host],
            reconnect_attempts_max=1,
            reconnect_sleep_initial=0,  # stomp.py would sleep 0.2 s after a refusal; kew backs off
            heartbeats=o.heartbeats,
            auto_decode=False,
            keepalive=o.keepalive,
            timeout=o.connect_timeout,
            vhost=o.host_header(host[0]),
            heart_beat_receive_scale=o.heart_beat_receive_scale,
            bind_host_port=o.bind_host_port,
        )
        if o.tls:
            conn.set_ssl(
                for_hosts=[host],
                ca_certs=o.ca_certs,
                cert_file=o.certfile,
                key_file=o.keyfile,
                password=o.ssl_password,
                verify=o.verify,
            )
        conn.set_listener("kew", self)
        transport = conn.transport
        if hasattr(transport, "_BaseTransport__read_frames"):  # stomp.py 8.1 .. 9.0
            limit = o.max_message_size + _HEADROOM
            transport._BaseTransport__read_frames = _FrameReader(self, transport, limit)
        self.conn = conn
        # Not wait=True: stomp.py waits for ever when a server never answers
        # CONNECT (a server that is not STOMP); connect_timeout bounds it.
        self._connected = False
        conn.connect(o.login, o.passcode, wait=False, headers={"client-id": _client_id()})
        deadline = time.monotonic() + o.connect_timeout
        with self._cond:
            while not self._connected and self.lost is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Lost(
                        f"no CONNECTED frame within {o.connect_timeout:g} s (is it a STOMP server?)"
                    )
                self._cond.wait(left)
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

    def _explain(
        self, host: tuple[str, int], e: BaseException, took: float = 0.0
    ) -> tuple[str, KewError | None]:
        """Why a connection failed, and the error to raise at once when
        trying again cannot help (None: try again).  stomp.py hides TLS
        errors and refusals, so those are probed; not a host that let the
        TCP connect time out (``took``): a probe would wait as long again."""
        o, where = self.options, f"{host[0]}:{host[1]}"
        if isinstance(e, ConnectFailedException) and took >= o.connect_timeout:
            return f"{where}: no answer within connect_timeout={o.connect_timeout:g} s", None
        if self.refused is not None:
            said = f"{where}: {self.refused}"
            if _REFUSAL.search(self.refused):
                who = f"user {o.login!r}" if o.login else "no login"
                return said, AccessRefused(
                    f"STOMP broker at {self.url} refused the login ({who}, virtual host "
                    f"{o.host_header(host[0])!r}): {said}"
                )
            return said, BrokerUnavailable(
                f"STOMP broker at {self.url} refused the connection: {said}"
            )
        if self.foreign is not None:
            shown = repr(self.foreign)
            if o.passcode:
                shown = shown.replace(o.passcode, "***")
            what = next((name for start, name in _SPEAKERS if self.foreign.startswith(start)), "")
            said = f"{where} does not speak STOMP: it answered CONNECT with {shown}"
            said += f" ({what})" if what else ""
            return said, BrokerUnavailable(f"{self.url}: {said}")
        if o.tls:
            problem = self._probe_tls(host)
            if problem is not None:
                said = f"{where}: {problem}"
                if any(w in problem.lower() for w in ("certificate", "wrong version number")):
                    return said, BrokerUnavailable(f"STOMP broker at {self.url}: {said}")
                return said, None
        else:
            try:
                with socket.create_connection(host, timeout=o.connect_timeout):
                    pass
            except OSError as os_error:
                return f"{where}: {os_error}", None
        detail = str(e) or self.lost or "no CONNECTED frame"
        return f"{where}: {type(e).__name__}: {detail}", None

    def _probe_tls(self, host: tuple[str, int]) -> str | None:
        """What a TLS handshake with ``host`` says, if it fails."""
        o = self.options
        try:
            context = ssl.create_default_context(cafile=o.ca_certs)
            if not o.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if o.certfile:
                context.load_cert_chain(o.certfile, o.keyfile, o.ssl_password)
            with (
                socket.create_connection(host, timeout=o.connect_timeout) as raw,
                context.wrap_socket(raw, server_hostname=host[0]),
            ):
                pass
        except ssl.SSLError as tls_error:
            if "wrong version number" in str(tls_error).lower():
                return f"TLS failed: {tls_error} (the port does not speak TLS: stomp://?)"
            return f"TLS failed: {tls_error}"
        except OSError as os_error:
            return str(os_error)
        return None

    def _close_quietly(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.remove_listener("kew")
            with contextlib.suppress(Exception):
                conn.disconnect()

    # one process's
    def usable(self) -> bool:
        """Connected, not lost, and this process's (not a forked parent's)."""
        return self.lost is None and self.conn is not None and self.pid == os.getpid()

    def _in_child(self) -> None:
        """In a child made by fork: the parent's connection.  No frame is
        ever written on it (two processes' frames would mix on one socket);
        this process's copy of the socket is closed without a word to the
        broker (so that the broker sees the parent's connection end when
        the parent ends it), and the lock a parent's thread held is new."""
        if self.pid == os.getpid():
            return
        self.lost = self.lost or "the process forked: the connection is the parent's"
        self._cond = threading.Condition()
        conn, self.conn = self.conn, None
        sock = getattr(getattr(conn, "transport", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # this process's descriptor: no bytes are sent, TLS or not

    def declares_stale(self, delay_queues: Collection[str]) -> bool:
        """Whether a RabbitMQ delay queue of these was declared on this
        connection so long ago that it could expire before a message sent
        now.  A SEND with ``x-*`` headers declares its queue, which expires
        ``ttl + DELAY_EXPIRES`` ms after its last declare (a publish is no
        use); but RabbitMQ's STOMP plugin declares a queue once per
        connection.  A delay queue first sent to here more than
        ``DELAY_EXPIRES / 2`` ago needs a new connection, whose first SEND
        declares it again.  Notes those declared now."""
        now, stale = time.monotonic(), False
        for queue in delay_queues:
            first = self.declared.setdefault(queue, now)
            stale = stale or now - first >= DELAY_EXPIRES / 2000
        return stale

    # frames
    def new_receipt(self) -> str:
        return f"kew-{next(self._ids)}"

    def check(self) -> None:
        if not self.usable():
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
        if self.pid != os.getpid():
            self._in_child()  # not this process's: never a frame on it
            return
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
