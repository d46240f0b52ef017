"""Messages another program writes to kew's STOMP queues with raw stomp.py
(as docs/wire-format.md tells it to), whatever they carry: each ends as a
delivery or a dead letter with the reason, and the consumer goes on (the
foreign-producer kit, on the tests' own ActiveMQ and on RabbitMQ's STOMP
plugin).  Also: kew's int headers without ``kew-ints``, the dead letters of
malformed frames through the Browser API, a second ack of one delivery, and
unexpected errors in the consumer's threads."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import msgspec
import pytest
import stomp

import kew
from kew.qchan import DeadLetterInfo
from kew.qchan.spi import Connector, ConsumerFailed, Delivery, Message, now_ms
from kew.qchan.spi.wire import Malformed
from kew.testing.foreign import (
    DEAD,
    DELIVERED,
    MISSING,
    CannotWrite,
    Envelope,
    ForeignProducerKit,
    ForeignWriter,
    Item,
    good_id,
)
from kew.testing.util import wait_for
from kew_artemis._frames import read_frame, salvage_frame
from kew_artemis.provider import Options, StompConsumer
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp, require_stomp_server

RABBIT_URL = "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&max_message_size=1048576"


def _activemq_url(activemq: ActiveMQServer) -> str:
    return f"stomp://127.0.0.1:{activemq.port}/?dialect=activemq&max_message_size=1048576"


def _body(seq: int) -> bytes:
    return msgspec.json.encode(Item(seq))


# -- the raw writer ------------------------------------------------------------


class _Receipts(stomp.ConnectionListener):  # type: ignore[misc]
    """Receipts and ERROR frames by receipt id; a loss."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done: set[str] = set()
        self.errors: dict[str, str] = {}
        self.failure = ""  # an ERROR without a receipt id, or the connection lost

    def on_receipt(self, frame: Any) -> None:
        with self.cond:
            self.done.add(frame.headers.get("receipt-id", ""))
            self.cond.notify_all()

    def on_error(self, frame: Any) -> None:
        message = frame.headers.get("message", "") or "ERROR frame"
        with self.cond:
            rid = frame.headers.get("receipt-id")
            if rid:
                self.errors[rid] = message
            else:
                self.failure = message
            self.cond.notify_all()

    def on_disconnected(self) -> None:
        with self.cond:
            self.failure = self.failure or "the broker closed the connection"
            self.cond.notify_all()

    def wait(self, rid: str, timeout: float) -> str:
        """'' once the receipt came; else the broker's words."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.done:
                if rid in self.errors:
                    return self.errors[rid]
                if self.failure:
                    return self.failure
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"no receipt within {timeout} s"
                self.cond.wait(left)
            return ""


def _text(what: str, value: Any) -> str:
    """A header value as STOMP carries it: UTF-8 text."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise CannotWrite(
                f"{what} is bytes that are not UTF-8; STOMP headers are UTF-8 text"
            ) from None
    return value if isinstance(value, str) else str(value)


#: A header value that is not UTF-8, written byte for byte on a socket.
NOT_UTF8 = "header bytes not UTF-8 (raw socket)"

#: Provider-specific frames: name -> (outcome, headers besides persistent/receipt).
RAW: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "kew-ints not JSON": (DEAD, lambda: {"kew-id": good_id(), "kew-ints": "{"}),
    "kew-ints not a list": (DEAD, lambda: {"kew-id": good_id(), "kew-ints": '{"n": 1}'}),
    "kew-ints lists a header that is not decimal": (
        DEAD,
        lambda: {"kew-id": good_id(), "n": "x7", "kew-ints": '["n"]'},
    ),
    "kew-ints lists a decimal with a plus sign": (
        DEAD,
        lambda: {"kew-id": good_id(), "n": "+7", "kew-ints": '["n"]'},
    ),
    "kew-sent-at not decimal": (DEAD, lambda: {"kew-id": good_id(), "kew-sent-at": "yesterday"}),
    "kew-count a decimal fraction": (DEAD, lambda: {"kew-id": good_id(), "kew-count": "1.0"}),
    "kew-dead-count not decimal": (DEAD, lambda: {"kew-id": good_id(), "kew-dead-count": "many"}),
    "kew-deliver-at decimal without kew-ints": (
        DELIVERED,
        lambda: {
            "kew-id": good_id(),
            "kew-sent-at": str(int(time.time() * 1000) - 2000),
            "kew-deliver-at": str(int(time.time() * 1000) - 1000),
            "kew-count": "1",
        },
    ),
    "kew-id with a space": (DEAD, lambda: {"kew-id": "two words"}),
    # stomp.py writes a tuple as one header line per value; STOMP 1.2 says
    # the first one counts, and both brokers keep the first
    "kew-id twice in one frame": (DELIVERED, lambda: {"kew-id": (good_id(), good_id())}),
    # kew's own count of releases, not the producer's: ignored when damaged
    "kew-redeliveries not a count": (
        DELIVERED,
        lambda: {"kew-id": good_id(), "kew-redeliveries": "x"},
    ),
    "no kew header at all": (DELIVERED, lambda: {"content-type": "application/json"}),
    "escaped name kew-h-destination": (
        DELIVERED,
        lambda: {"kew-id": good_id(), "kew-h-destination": "elsewhere"},
    ),
    "value with colon, newline, backslash": (
        DELIVERED,
        lambda: {"kew-id": good_id(), "note": "a:b\nc\\d\re"},
    ),
    # STOMP 1.2 allows a NUL byte in a header value, and both brokers hand
    # it on; stomp.py's own reader cut such a frame in two
    "NUL in a header value": (DELIVERED, lambda: {"kew-id": good_id(), "aa": "a\x00b"}),
    "NUL in kew-sent-at": (DEAD, lambda: {"kew-id": good_id(), "kew-sent-at": "1\x002"}),
    "broker headers (JMSType, AMQ_SCHEDULED_DELAY 0, priority)": (
        DELIVERED,
        lambda: {"kew-id": good_id(), "JMSType": "t", "AMQ_SCHEDULED_DELAY": "0", "priority": "9"},
    ),
}


def _read_one(s: socket.socket) -> bytes:
    """One frame from a raw socket (up to its NUL), heart-beats skipped."""
    data = b""
    while b"\x00" not in data.lstrip(b"\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.lstrip(b"\r\n")


class StompWriter:
    """Writes to kew's STOMP queues as docs/wire-format.md tells a program
    in another language: SEND to ``/queue/<q>``, ``persistent:true``, a
    receipt awaited (the broker has it); the id in ``kew-id``, headers as
    UTF-8 text, integers as decimal text listed in ``kew-ints``."""

    _ids = itertools.count(1)

    def __init__(self, url: str) -> None:
        """The broker of a kew ``stomp://`` URL (host, port, login, vhost)."""
        o = Options.from_url(url)
        self._port = o.hosts[0][1]
        self._login, self._passcode = o.login, o.passcode
        self._vhost = o.vhost or ("/" if o.dialect == "rabbitmq" else "127.0.0.1")
        self._conn: Any = None
        self._listener = _Receipts()

    def _connected(self) -> Any:
        if self._conn is not None and self._conn.is_connected() and not self._listener.failure:
            return self._conn
        self.close()
        self._listener = _Receipts()
        conn: Any = stomp.Connection12(
            [("127.0.0.1", self._port)], auto_decode=False, vhost=self._vhost, heartbeats=(0, 0)
        )
        conn.set_listener("receipts", self._listener)
        conn.connect(self._login, self._passcode, wait=True)
        self._conn = conn
        return conn

    def send(self, queue: str, body: bytes, headers: dict[str, Any]) -> None:
        conn = self._connected()
        rid = f"w-{next(self._ids)}"
        conn.send(
            f"/queue/{queue}", body, headers={**headers, "persistent": "true", "receipt": rid}
        )
        refused = self._listener.wait(rid, 30)
        if refused:
            self.close()  # the broker closes the connection after an ERROR
            raise CannotWrite(f"the broker refused the frame: {refused}")

    def write(self, queue: str, envelope: Envelope) -> None:
        headers: dict[str, Any] = {}
        if envelope.id is not MISSING:
            headers["kew-id"] = _text("the message id", envelope.id)
        if envelope.content_type is not MISSING:
            headers["content-type"] = _text("the content type", envelope.content_type)
        ints: list[str] = []
        for name, value in envelope.headers.items():
            if isinstance(value, int) and not isinstance(value, bool):
                ints.append(name)
            headers[name] = _text(f"header {name!r}", value)  # floats, None ...: their text
        if ints:
            headers["kew-ints"] = json.dumps(ints)
        self.send(queue, envelope.body, headers)

    def write_raw(self, queue: str, case: str, seq: int) -> None:
        if case == NOT_UTF8:  # stomp.py writes text only: bytes on a socket
            self.send_bytes(queue, _body(seq), {"kew-id": good_id().encode(), "blob": b"\xff\xfe"})
            return
        self.send(queue, _body(seq), RAW[case][1]())

    def send_bytes(self, queue: str, body: bytes, headers: dict[str, bytes]) -> None:
        """A SEND frame written byte for byte on a socket of its own."""
        with socket.create_connection(("127.0.0.1", self._port), timeout=30) as s:
            login = b"".join(
                b"%s:%s\n" % (k, v.encode())
                for k, v in ((b"login", self._login), (b"passcode", self._passcode))
                if v is not None
            )
            s.sendall(
                b"CONNECT\naccept-version:1.2\nhost:%s\n%s\n\x00" % (self._vhost.encode(), login)
            )
            if not _read_one(s).startswith(b"CONNECTED"):
                raise CannotWrite("the broker did not let the raw socket in")
            lines = [b"SEND", b"destination:/queue/" + queue.encode(), b"persistent:true",
                     b"receipt:raw-1", b"content-length:%d" % len(body)]  # fmt: skip
            lines += [k.encode() + b":" + v for k, v in headers.items()]
            s.sendall(b"\n".join(lines) + b"\n\n" + body + b"\x00")
            reply = _read_one(s)
            if not reply.startswith(b"RECEIPT"):
                raise CannotWrite(f"the broker refused the frame: {reply[:200]!r}")
            s.sendall(b"DISCONNECT\n\n\x00")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()


# -- the kit on both brokers ---------------------------------------------------


class _StompForeign(ForeignProducerKit):
    RAW_CASES: ClassVar[dict[str, str]] = {name: outcome for name, (outcome, _) in RAW.items()}
    OVERRIDES: ClassVar[dict[str, tuple[str, str]]] = {
        # A frame without kew-id has the broker's message-id, which every
        # STOMP broker sets and keeps with the message: a plain STOMP
        # producer's frames are consumed (an empty or bad kew-id is dead).
        "no message id": (DELIVERED, ""),
        # STOMP header values are text: a producer writing a float, a
        # boolean, null, a table or a list writes its text ("1.5", "True",
        # "None", "{'a': 1}", "[1, 2]"), which kew delivers as text.
        "header: float": (DELIVERED, ""),
        "header: boolean": (DELIVERED, ""),
        "header: null": (DELIVERED, ""),
        "header: nested table": (DELIVERED, ""),
        "header: list": (DELIVERED, ""),
    }

    @pytest.fixture
    def writer(self, url: str) -> Iterator[ForeignWriter]:
        w = StompWriter(url)
        yield w
        w.close()

    # -- around the kit --------------------------------------------------------

    def test_kew_int_headers_are_ints_without_kew_ints(
        self, connector: Connector, writer: StompWriter, queue_name: str
    ) -> None:
        """A producer following the doc writes kew-sent-at/kew-deliver-at/
        kew-count as decimal text; kew reads them as integers even without
        ``kew-ints`` (they were text, and a consumer reading the schedule
        dead-lettered them: ``bad schedule headers``).  A header listed in
        kew-ints is an int; one not listed stays text."""
        connector.declare(queue_name)
        now = int(time.time() * 1000)
        kew_ints = {"kew-sent-at": now - 2000, "kew-deliver-at": now - 1000, "kew-count": 2}
        plain = {k: str(v) for k, v in kew_ints.items()}
        writer.send(queue_name, _body(1), {"kew-id": "m-1", **plain, "n": "5", "kew-ints": '["n"]',
                                           "s": "5"})  # fmt: skip
        consumer = connector.consumer(queue_name, 1)
        try:
            (d,) = wait_for(lambda: consumer.fetch(1, 1.0), 20, what="the frame")
            assert dict(d.message.headers) == {**kew_ints, "n": 5, "s": "5"}
            assert d.message.id == "m-1"
            consumer.ack(d)
        finally:
            consumer.close()
        # the schedule is read by a repeating sink: delivered, not dead
        writer.send(queue_name, _body(2), {"kew-id": good_id(), **plain})
        q = kew.Queue(connector, queue_name, Item)
        got: list[int] = []

        def once(item: Item) -> kew.RepeatAction:
            got.append(item.seq)
            return kew.RepeatAction.STOP

        with q.repeat_sink(once, [], print):
            wait_for(lambda: got, 20, what="the scheduled frame")
        assert got == [2] and q.dead.list() == []

    def test_nul_bytes_in_headers_and_body_are_kept(
        self, connector: Connector, writer: StompWriter, queue_name: str
    ) -> None:
        """A NUL byte in header values (first, last, alone) and in the body
        comes back exactly; the frames after it are read as they were."""
        connector.declare(queue_name)
        headers = {"aa": "a\x00b", "zz": "z\x00", "mm": "\x00"}
        writer.send(queue_name, b"\x00" + _body(1) + b"\x00", {"kew-id": "m-1", **headers})
        writer.send(queue_name, _body(2), {"kew-id": "m-2"})
        consumer = connector.consumer(queue_name, 2)
        got: list[Delivery] = []
        try:
            while len(got) < 2:
                batch = wait_for(lambda: consumer.fetch(2, 1.0), 20, what="the frames")
                for d in batch:
                    consumer.ack(d)
                got.extend(batch)
        finally:
            consumer.close()
        assert [d.message.id for d in got] == ["m-1", "m-2"]
        assert dict(got[0].message.headers) == headers
        assert got[0].message.body == b"\x00" + _body(1) + b"\x00"
        assert got[1].message.body == _body(2) and got[1].delivery_count == 1

    def test_malformed_dead_letters_list_requeue_purge(
        self, connector: Connector, writer: StompWriter, queue_name: str
    ) -> None:
        """Dead letters of malformed frames keep their bodies and what
        headers could be kept, and the Browser API lists, requeues and
        purges them.  Requeued, a frame kew could keep as its wire format
        (a bad kew-ints dropped, the broker's id for a bad kew-id) is
        delivered; one whose kew header is still bad dies again."""
        connector.declare(queue_name)
        writer.send(queue_name, _body(101), {"kew-id": "bad-ints", "kew-ints": "{", "n": "7"})
        writer.send(queue_name, _body(102), {"kew-id": "bad-sent", "kew-sent-at": "yesterday"})
        writer.send(queue_name, _body(103), {"kew-id": "two words"})
        writer.send(queue_name, _body(1), {"kew-id": good_id()})
        q = kew.Queue(connector, queue_name, Item)
        got: list[int] = []
        with q.sink(lambda i: got.append(i.seq)):
            wait_for(lambda: len(q.dead.list()) == 3 and got == [1], 20, what="3 dead, 1 good")
        dead = {d.body: d for d in q.dead.list()}
        assert set(dead) == {_body(101), _body(102), _body(103)}
        assert "kew-ints" in dead[_body(101)].reason and dead[_body(101)].id == "bad-ints"
        assert dead[_body(101)].headers.get("n") == "7"
        assert "kew-sent-at" in dead[_body(102)].reason
        assert dead[_body(102)].headers.get("kew-sent-at") == "yesterday"
        assert "message id" in dead[_body(103)].reason and dead[_body(103)].id != "two words"
        assert all(d.reason.startswith("malformed envelope: ") for d in dead.values())
        assert q.dead.requeue() == 3
        with q.sink(lambda i: got.append(i.seq)):
            wait_for(lambda: sorted(got) == [1, 101, 103], 20, what="the two repaired ones")
            again = wait_for(lambda: q.dead.list(), 20, what="the one still malformed")
        assert [d.id for d in again] == ["bad-sent"] and "kew-sent-at" in again[0].reason
        assert q.dead.purge() == 1 and q.dead.list() == []

    def test_second_ack_is_a_no_op(
        self, connector: Connector, writer: StompWriter, queue_name: str
    ) -> None:
        """Settling a delivery twice sends one ACK frame: the second ack (or
        a dead letter or release after the ack) does nothing, and the
        connection stays (a second ACK is an error on RabbitMQ)."""
        connector.declare(queue_name)
        writer.send(queue_name, _body(1), {"kew-id": good_id()})
        writer.send(queue_name, _body(2), {"kew-id": good_id()})
        consumer = cast(StompConsumer, connector.consumer(queue_name, 1))
        sent: list[str] = []

        class Count(stomp.ConnectionListener):  # type: ignore[misc]
            def on_send(self, frame: Any) -> None:
                sent.append(frame.cmd)

        try:
            link = consumer._link
            assert link is not None
            link.conn.set_listener("count", Count())
            (first,) = wait_for(lambda: consumer.fetch(1, 1.0), 20, what="the first frame")
            consumer.ack(first)
            consumer.ack(first)
            consumer.dead_letter(first, "after the ack")
            consumer.release(first)
            assert sent.count("ACK") == 1 and sent.count("SEND") == 0
            (second,) = wait_for(lambda: consumer.fetch(1, 1.0), 20, what="the second frame")
            assert second.message.body == _body(2) and second.delivery_count == 1
            consumer.ack(second)
            consumer.ack(second)
            assert sent.count("ACK") == 2 and consumer.reconnects == 0
        finally:
            consumer.close()
        browser = connector.browser(queue_name)
        assert browser.stats().ready == 0 and browser.dead_letters(10) == []

    def test_unexpected_errors_are_counted_and_recovered(
        self, connector: Connector, writer: StompWriter, queue_name: str
    ) -> None:
        """A MESSAGE frame whose handling raises (here an injected fault in
        the callback stomp.py's receiver thread calls) is logged, counted
        and recovered from: the connection is dropped, the broker hands the
        frame back, and it is delivered on the next connection.  Repeated
        faults of the connection thread fail the consumer for good: fetch
        raises ConsumerFailed and the subscription says so."""
        connector.declare(queue_name)
        q = kew.Queue(connector, queue_name, Item)
        got: list[int] = []
        sub = q.sink(lambda i: got.append(i.seq))
        consumer: Any = sub._consumer
        try:
            link = consumer._link
            real = link.on_message_cb

            def once(*args: Any) -> None:
                link.on_message_cb = real
                raise RuntimeError("injected fault")

            link.on_message_cb = once
            writer.send(queue_name, _body(1), {"kew-id": good_id()})
            wait_for(lambda: got == [1], 30, what="the frame after the fault")
            assert link.errors == 1 and consumer.reconnects == 1 and sub.alive

            def boom(backoff: object) -> bool:
                raise RuntimeError("injected connection fault")

            consumer._session = boom
            consumer._link.close()  # lost: the connection thread starts a new session
            wait_for(lambda: sub.error is not None, 30, what="the consumer to fail")
            assert isinstance(sub.error, ConsumerFailed) and not sub.alive
            assert "injected connection fault" in str(sub.error)
            assert consumer.errors == consumer.MAX_FAULTS
            with pytest.raises(ConsumerFailed):
                consumer.fetch(1, 0.1)
        finally:
            sub.stop()


class TestActiveMQForeign(_StompForeign):
    """The tests' own ActiveMQ Classic (dialect=activemq)."""

    # ActiveMQ decodes a header that is not UTF-8 into U+FFFD characters
    # before it stores the message: kew gets text, and delivers it
    RAW_CASES = {**_StompForeign.RAW_CASES, NOT_UTF8: DELIVERED}

    @pytest.fixture
    def url(self, activemq: ActiveMQServer) -> str:
        return _activemq_url(activemq)


class TestRabbitStompForeign(_StompForeign):
    """RabbitMQ's STOMP plugin on the machine's RabbitMQ (dialect=rabbitmq)."""

    # RabbitMQ hands the bytes on as they were: kew dead-letters the frame
    RAW_CASES = {**_StompForeign.RAW_CASES, NOT_UTF8: DEAD}

    @pytest.fixture
    def url(self) -> str:
        require_rabbitmq_stomp()
        return RABBIT_URL


# -- a producer that knows nothing of kew ----------------------------------------


def test_foreign_producer_interoperates(activemq: ActiveMQServer) -> None:
    """Frames of a plain STOMP producer: without kew headers they are
    consumed (the broker's message-id is their id); a damaged kew header or
    an undecodable body is dead-lettered with the reason; the rest flow."""
    name = f"foreign-{os.urandom(3).hex()}"
    raw: Any = stomp.Connection12([("127.0.0.1", activemq.port)], auto_decode=False)
    raw.connect(wait=True)
    dest = f"/queue/{name}"
    plain = {"persistent": "true", "content-type": "application/json"}
    raw.send(dest, b'{"n": 1}', headers=plain)  # no kew headers at all
    raw.send(dest, b'{"n": 2}', headers={**plain, "kew-ints": "{", "kew-redeliveries": "x"})
    raw.send(dest, b"not json", headers={**plain, "kew-id": "bad-1"})
    raw.send(dest, b'{"n": 3}', headers={**plain, "kew-id": "good-3", "JMSType": "t"})
    raw.disconnect()
    conn = kew.connect(activemq.url)
    q = kew.Queue(conn, name, dict[str, int])
    got: list[dict[str, int]] = []
    try:
        with q.sink(got.append):
            wait_for(lambda: len(got) == 2, 15, what="the two good messages")

            def two_dead() -> list[DeadLetterInfo]:
                listed = q.dead.list()
                return listed if len(listed) == 2 else []

            dead = wait_for(two_dead, 10, what="the two bad ones")
        assert got == [{"n": 1}, {"n": 3}]
        reasons = {d.body: d.reason for d in dead}
        assert "cannot decode" in reasons[b"not json"]
        assert "kew-ints" in reasons[b'{"n": 2}'] and "malformed envelope" in reasons[b'{"n": 2}']
        assert [d.id for d in dead if d.body == b"not json"] == ["bad-1"]
        assert all(d.id.startswith("ID:") for d in dead if d.body != b"not json")
    finally:
        conn.delete(name)
        conn.close()


# -- which server answers ---------------------------------------------------------


def test_the_server_check_names_what_answered(activemq: ActiveMQServer) -> None:
    """The check the RabbitMQ STOMP fixtures make: a port where ActiveMQ
    answers is refused at once, naming ActiveMQ (a skip locally, a failure
    under CI); the port the ActiveMQ fixture started answers as ActiveMQ."""
    port = activemq.port
    assert require_stomp_server("ActiveMQ", "127.0.0.1", port).startswith("ActiveMQ/")
    outcomes = (pytest.skip.Exception, pytest.fail.Exception)
    with pytest.raises(outcomes, match=rf"127\.0\.0\.1:{port} is answered by 'ActiveMQ/[0-9.]+', "
                       "not RabbitMQ"):  # fmt: skip
        require_stomp_server("RabbitMQ", "127.0.0.1", port, login="guest", passcode="guest")


# -- reading one frame (no broker) ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({"kew-id": "m", "kew-ints": "[1]"}, "'kew-ints' must be a JSON array of header names"),
        ({"kew-id": "m", "kew-ints": '["n"]', "n": " 7"}, "header 'n' must be an integer"),
        ({"kew-id": "m", "kew-count": "9" * 5000}, "header 'kew-count' must be an integer"),
        ({"kew-id": "m", "kew-dead-at": "now"}, "header 'kew-dead-at' must be an integer"),
        ({"kew-id": "", "message-id": "ID:1"}, "no message id"),
        ({"kew-id": "i" * 256}, "256 characters long"),
        ({"message-id": "two words"}, "printable ASCII"),
        ({"kew-id": "m", "kew:unreadable": "header 'x' holds bytes"}, "header 'x' holds bytes"),
    ],
)
def test_read_frame_refuses(headers: dict[str, str], words: str) -> None:
    with pytest.raises(Malformed, match=re.escape(words)) as e:
        read_frame(headers, b"body")
    assert str(e.value).startswith("malformed envelope: ")
    kept = salvage_frame({**headers, "message-id": "ID:9", "a": "1"}, b"body")
    assert kept.body == b"body" and kept.headers.get("a") == "1"
    assert kept.id in (headers.get("kew-id"), "ID:9")


def test_read_frame_types_kew_ints_and_leaves_broker_headers_out() -> None:
    wire = {
        "kew-id": "m", "kew-sent-at": "-5", "kew-count": "3", "kew-ints": '["n", "gone"]',
        "n": "12345678901234567890", "s": "5", "kew-h-destination": "d", "destination": "/q",
        "message-id": "ID:1", "ack": "ID:1", "JMSType": "t", "x-death": "y", "priority": "4",
        "kew-redeliveries": "2", "redelivered": "true",
    }  # fmt: skip
    m, count = read_frame(wire, b"")
    assert m.id == "m" and count == 4
    assert dict(m.headers) == {
        "kew-sent-at": -5, "kew-count": 3, "n": 12345678901234567890, "s": "5",
        "destination": "d",
    }  # fmt: skip
    assert read_frame({"message-id": "ID:7"}, b"")[0].id == "ID:7"  # no kew-id


def test_a_delayed_message_comes_without_the_brokers_scheduler_headers(
    activemq: ActiveMQServer,
) -> None:
    """ActiveMQ's scheduler stamps what it delivers late with
    ``scheduledJobId``: the broker's, not the application's, so it is not in
    the delivered message's headers (an app header of that name travels
    escaped, and comes back as it was sent)."""
    name = f"sched-{os.urandom(3).hex()}"
    conn = kew.connect(_activemq_url(activemq))
    try:
        conn.declare(name)
        sent = Message("m-1", b"{}", headers={"app": "v"}, deliver_at=now_ms() + 300)
        mine = Message("m-2", b"{}", headers={"scheduledJobId": "mine"}, deliver_at=now_ms() + 300)
        producer = conn.producer(name)
        producer.send_many([sent, mine])
        consumer = conn.consumer(name, 2)
        got: dict[str, Delivery] = {}

        def both() -> bool:
            for d in consumer.fetch(2, 0.5):
                got[d.message.id] = d
                consumer.ack(d)
            return len(got) == 2

        wait_for(both, 20, what="the two delayed messages")
        assert got["m-1"].message.headers.get("app") == "v"
        assert not any(k.lower() == "scheduledjobid" for k in got["m-1"].message.headers)
        assert got["m-2"].message.headers.get("scheduledJobId") == "mine"
        consumer.close()
        producer.close()
    finally:
        conn.delete(name)
        conn.close()
