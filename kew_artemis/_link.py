"""One STOMP connection of kew's own (stomp.py's reconnect is off): receipts
awaited by id, ERROR frames turned into refusals or a loss, MESSAGE frames
handed to a callback that can never stop stomp.py's receiver thread."""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import stomp
from stomp.exception import ConnectionClosedException, InterruptedException, StompException
from stomp.utils import HEARTBEAT_FRAME, parse_frame

from kew.qchan.spi import BrokerUnavailable, ConfigError, SendError
from kew_artemis._frames import H_UNREADABLE, Options

log = logging.getLogger("kew.stomp")


_PREAMBLE_END = re.compile(rb"\n\n|\r\n\r\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*([0-9]+)\r?$", re.MULTILINE)
#: Bytes of an unfinished frame beyond its connection's max_message_size
#: after which the stream is taken as broken (the connection is dropped).
_HEADROOM = 16 << 20


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
            try:
                got = self._frames()
            except Exception as e:  # never stop stomp.py's I/O thread
                self._link.errors += 1
                log.exception("kew: cannot read STOMP frames from %s; reconnecting", self._link.url)
                self._link._lose(f"unreadable frames: {type(e).__name__}: {e}")
                return
            if got and t.blocking:
                return

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
        self.generation = -1  # set by a consumer: which of its connections this is
        self.errors = 0  # unexpected errors on the receiver thread (each drops the connection)
        self._connected = False  # a CONNECTED frame came

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
