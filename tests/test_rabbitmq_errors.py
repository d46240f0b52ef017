"""What a user meets first with an ``amqp://`` URL, against real servers:
kew's errors (never pika's) at the first operation, with the broker's
words and the password masked; no retrying of what retrying cannot fix; no
network I/O before the first operation; a connector that works in children
made by fork; pika's URL options; the first delivery without a start-up
delay; and ``delete`` leaving no delay queue behind.

Refusals run on the machine's RabbitMQ (a wrong password, a vhost that does
not exist) and, for users and vhosts this module creates, on the tests' own
node (``rabbitmq_node``), never on the machine's."""

from __future__ import annotations

import http.server
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

import kew
import kew_rabbitmq  # imported here, so that the timings below measure no import
from kew.qchan.spi import Message
from kew.testing.util import free_port, port_open, require, wait_for
from kew_rabbitmq.provider import RabbitConsumer
from tests.brokers.rabbitmq import RabbitMQServer

MACHINE = "amqp://guest:{password}@127.0.0.1:5672/{vhost}"
PASSWORD = "s3cret-Pa55"


def _machine() -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")


def _timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


def _queue(url: str, name: str = "errors") -> kew.Queue[int]:
    """``kew.connect`` and ``kew.Queue`` only read the URL (see the
    no-I/O test): every error below comes from the operation after."""
    return kew.Queue(kew.connect(url), name, int)


def _raw_exists(queue: str) -> bool:
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        conn.channel().queue_declare(queue, passive=True)
        return True
    except ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return False
    finally:
        if conn.is_open:
            conn.close()


# -- (1) refused: at once, never retried, masked -------------------------------------------


def test_a_wrong_password_is_refused_at_once_and_masked() -> None:
    _machine()
    wrong = f"wrong-{PASSWORD}"
    q = _queue(MACHINE.format(password=wrong, vhost=""))  # retries=10: none may happen
    for operation in (q.declare, lambda: q.send(1), lambda: q.browser().stats()):
        e, took = _timed(operation)
        assert isinstance(e, kew.AccessRefused), repr(e)
        assert took < 2.0  # final: not rounds of reconnecting
        assert "refused the login of user 'guest'" in str(e)
        assert "ACCESS_REFUSED" in str(e) and "guest:***@" in str(e)
        assert wrong not in str(e) and wrong not in repr(q.connector)
    # a user that does not exist: refused alike
    e, took = _timed(_queue(f"amqp://nobody-{os.urandom(3).hex()}:{wrong}@127.0.0.1/").declare)
    assert isinstance(e, kew.AccessRefused) and took < 2.0, repr(e)
    assert "refused the login of user 'nobody-" in str(e) and wrong not in str(e)
    _queue(MACHINE.format(password="guest", vhost="")).declare()  # the right one works


def test_an_unknown_virtual_host_is_refused_at_once() -> None:
    _machine()
    vhost = f"nowhere-{os.urandom(3).hex()}"
    e, took = _timed(_queue(MACHINE.format(password="guest", vhost=vhost)).declare)
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 2.0
    assert f"refused access to virtual host {vhost!r} for user 'guest'" in str(e)
    assert f"NOT_ALLOWED - vhost {vhost} not found" in str(e)


def test_a_refused_consumer_fails_at_start() -> None:
    """A sink whose login is refused raises AccessRefused at once (the
    provider's consumer itself too: the sink declares the queue first)."""
    _machine()
    q = _queue(MACHINE.format(password="nope-nope", vhost=""))
    e, took = _timed(lambda: q.sink(lambda i: None))
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 5.0 and "nope-nope" not in str(e)
    e, took = _timed(lambda: q.connector.consumer("errors", 1))
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 5.0 and "cannot consume from 'errors'" in str(e)
    assert "nope-nope" not in str(e)
    # the consumer's I/O thread ended: nothing keeps trying in the background
    wait_for(
        lambda: not [t for t in threading.enumerate() if t.name == "kew-amqp-errors"],
        5,
        what="the refused consumer's I/O thread to end",
    )


def test_refused_permissions_on_the_tests_node(rabbitmq_node: RabbitMQServer) -> None:
    """On the tests' own node: a user without access to the virtual host is
    refused at login; one allowed only queues named ``allowed-*`` is
    refused the permission to declare another (AccessRefused, not pika's
    ChannelClosedByBroker), and can use its own."""
    user, password = f"kew-{os.urandom(3).hex()}", secrets.token_hex(8)
    vhost = f"vh-{os.urandom(3).hex()}"
    rabbitmq_node.ctl("add_user", user, password)
    rabbitmq_node.ctl("add_vhost", vhost)
    try:
        url = f"amqp://{user}:{password}@127.0.0.1:{rabbitmq_node.port}/{vhost}"
        e, took = _timed(_queue(url).declare)
        assert isinstance(e, kew.AccessRefused), repr(e)
        assert took < 2.0 and password not in str(e)
        assert f"refused access to virtual host {vhost!r} for user {user!r}" in str(e)
        assert f"(530) NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'" in str(e)

        rabbitmq_node.ctl("set_permissions", "-p", vhost, user, "^allowed-", "^allowed-", ".*")
        e, took = _timed(_queue(url, "forbidden").declare)
        assert isinstance(e, kew.AccessRefused), repr(e)
        assert took < 2.0 and f"refused user {user!r} the permission" in str(e)
        assert "access to queue 'forbidden'" in str(e) and password not in str(e)
        allowed = _queue(url, "allowed-1")
        allowed.declare()
        # publishing goes through the default exchange, which needs write access too
        e, took = _timed(lambda: allowed.send(1))
        assert isinstance(e, kew.AccessRefused), repr(e)
        assert f"refused user {user!r} the permission to send to 'allowed-1'" in str(e)
        assert "access to exchange 'amq.default'" in str(e) and took < 2.0
        write = r"^(allowed-.*|amq\.default)$"
        rabbitmq_node.ctl("set_permissions", "-p", vhost, user, "^allowed-", write, ".*")
        got: list[int] = []
        with allowed.sink(got.append):
            allowed.send(1)
            wait_for(lambda: got == [1], 20, what="the allowed queue's message")
        allowed.connector.delete("allowed-1")
    finally:
        rabbitmq_node.ctl("delete_vhost", vhost)
        rabbitmq_node.ctl("delete_user", user)


# -- (2) a port that speaks another protocol -------------------------------------------------


@pytest.fixture
def http_port() -> Iterator[int]:
    """A tiny HTTP server: it waits for a request line that AMQP's protocol
    header never ends, saying nothing."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def hanging_up_port() -> Iterator[int]:
    """A server that answers with a line of its own and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


@pytest.mark.parametrize("server", ["redis", "http"])
def test_a_port_of_another_protocol_is_unavailable_within_the_connect_timeout(
    server: str, request: pytest.FixtureRequest
) -> None:
    """The machine's Redis and an HTTP server accept the TCP connection and
    say nothing to AMQP's protocol header: BrokerUnavailable once
    stack_timeout is spent (not pika's AMQPConnectorStackTimeout, and not
    once per retry: retries is 10)."""
    if server == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
        port = 6379
    else:
        port = request.getfixturevalue("http_port")
    q = _queue(f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/?stack_timeout=1.5")
    for operation in (q.declare, lambda: q.send(1)):
        e, took = _timed(operation)
        assert isinstance(e, kew.BrokerUnavailable), repr(e)
        assert 1.4 < took < 6.0
        assert f"127.0.0.1:{port} accepted the connection" in str(e)
        assert "does not speak AMQP 0-9-1" in str(e) and "within 1.5 s" in str(e)
        assert PASSWORD not in str(e) and "guest:***@" in str(e)


def test_a_server_that_hangs_up_is_unavailable_after_the_retries(hanging_up_port: int) -> None:
    q = _queue(f"amqp://127.0.0.1:{hanging_up_port}/?retries=2")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert "is unreachable after 3 attempt(s)" in str(e)
    assert "closed the connection during the AMQP handshake" in str(e)
    assert "not an AMQP 0-9-1 port?" in str(e) and took < 5.0


# -- (3) nobody listening --------------------------------------------------------------------


def test_a_closed_port_is_unavailable_after_the_retries() -> None:
    port = free_port()
    q = _queue(f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/?retries=3")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert "is unreachable after 4 attempt(s) over 1 host(s) in " in str(e)
    assert f"127.0.0.1:{port}: [Errno 111] Connection refused" in str(e)
    assert PASSWORD not in str(e)
    # Backoff: 0.1 s doubling, each delay at least half its base (jitter)
    assert 0.35 <= took < 10.0
    once = _queue(f"amqp://127.0.0.1:{port}/?retries=0")
    for operation in (lambda: once.send(1), lambda: once.sink(lambda i: None)):
        e, took = _timed(operation)
        assert isinstance(e, kew.BrokerUnavailable), repr(e)
        assert "after 1 attempt(s)" in str(e) and took < 1.0
    # pika's names for the same: connection_attempts (= retries + 1), retry_delay (fixed)
    e, took = _timed(
        _queue(f"amqp://127.0.0.1:{port}/?connection_attempts=3&retry_delay=0.3").declare
    )
    assert isinstance(e, kew.BrokerUnavailable) and "after 3 attempt(s)" in str(e)
    assert 0.3 <= took < 3.0  # two delays of 0.15 to 0.3 s


def _construct(url: str) -> float:
    started = time.monotonic()
    kew.Queue(kew.connect(url), "first", int)
    return time.monotonic() - started


def test_every_error_comes_at_the_first_operation_never_at_construction() -> None:
    """kew.connect() and kew.Queue() do no network I/O: with a closed port
    and the default 10 retries, any would take seconds.  (The best of three
    runs is timed: this 2-core machine is shared by other tests.)"""
    port = free_port()
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/"
    assert min(_construct(url) for _ in range(3)) < 0.1
    c = kew.connect(url + "?retries=0")
    assert isinstance(c, kew_rabbitmq.RabbitConnector)
    q = kew.Queue(c, "first", int)
    browser = c.browser("first")  # nor do a browser and a producer
    c.producer("first")
    with pytest.raises(kew.BrokerUnavailable):
        browser.stats()
    with pytest.raises(kew.BrokerUnavailable):
        q.send(1)


# -- (4) fork: a connector shared with children ------------------------------------------------


def _child(q: kew.Queue[str], own: str, parents: tuple[object, object]) -> None:
    """In a child: a message through the parent's producer (inherited with
    ``q``), one sent and consumed on a queue of its own, on connections of
    its own; then it closes what it used, as a well-behaved process does
    (had it used the parent's connections, that would close them for the
    parent and the next child too).  Exits 0 if all went well."""
    try:
        q.send(f"from child {os.getpid()}")
        mine = kew.Queue(q.connector, own, str)
        got: list[str] = []
        with mine.sink(got.append):
            mine.send(f"own {os.getpid()}")
            wait_for(lambda: got == [f"own {os.getpid()}"], 20, what="the child's own message")
        q.connector.delete(own)
        producer_conn, connector_conn = parents
        assert q.producer._conn is not producer_conn  # type: ignore[attr-defined]
        assert q.connector._conn is not connector_conn  # type: ignore[attr-defined]
        q.close()
        mine.close()
        q.connector.close()
    except BaseException as e:
        print(f"child failed: {e!r}", flush=True)
        os._exit(1)
    os._exit(0)


def _forked(q: kew.Queue[str], own: str, parents: tuple[object, object]) -> int:
    pid = os.fork()
    if pid == 0:
        _child(q, own, parents)
    exited: list[int] = []

    def reaped() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited.append(os.waitstatus_to_exitcode(status))
        return bool(done)

    try:
        wait_for(reaped, 60, interval=0.05, what="the child to exit (it blocked?)")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return exited[0]


def _multiprocessed(q: kew.Queue[str], own: str, parents: tuple[object, object]) -> int:
    p = multiprocessing.get_context("fork").Process(target=_child, args=(q, own, parents))
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError("the child blocked (killed after 60 s)")
    return p.exitcode


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_connector_works_in_forked_children_and_still_in_the_parent(how: str) -> None:
    """gunicorn --preload, multiprocessing: the parent sends and consumes,
    then two children one after the other send through the parent's
    producer and send and consume on queues of their own; each opens its
    own connections (the second child used to block for ever in
    basic_publish on the parent's), and the parent's keep working."""
    _machine()
    c = kew.connect(MACHINE.format(password="guest", vhost=""))
    name = f"fork-{os.urandom(4).hex()}"
    q = kew.Queue(c, name, str)
    got: list[str] = []
    children: list[str] = []
    try:
        with q.sink(got.append) as sub:  # the parent's consumer runs across the forks
            q.send("before")
            wait_for(lambda: got == ["before"], 20, what="the parent's message")
            producer: Any = q.producer
            connector: Any = c
            parents = (producer._conn, connector._conn)
            assert all(parents)
            for n in (1, 2):
                own = f"{name}-child-{n}"
                children.append(own)
                code = (_forked if how == "os.fork" else _multiprocessed)(q, own, parents)
                assert code == 0, f"child {n} exited with {code}"
            wait_for(lambda: len(got) == 3, 20, what="both children's messages")
            assert got[0] == "before" and all(g.startswith("from child") for g in got[1:])
            q.send("after")
            wait_for(lambda: got[-1:] == ["after"], 20, what="the parent, after the forks")
            assert q.browser().stats().ready == 0
            # the parent's connections were never touched by the children
            assert (producer._conn, connector._conn) == parents
            assert all(conn.is_open for conn in parents)
            assert sub._consumer.reconnects == 0  # type: ignore[attr-defined]
        for own in children:
            assert not _raw_exists(own)  # the child made it and deleted it
    finally:
        for own in children:
            c.delete(own)
        c.delete(name)
        c.close()


# -- (5) URL options ---------------------------------------------------------------------------


def test_pikas_url_options_are_taken() -> None:
    _machine()
    name = f"options-{os.urandom(3).hex()}"
    url = (
        "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5&socket_timeout=3&stack_timeout=5"
        "&blocked_connection_timeout=30&channel_max=100&frame_max=65536&locale=en_US"
        "&connection_attempts=2&retry_delay=0.2"
        f"&tcp_options={quote(repr({'TCP_KEEPIDLE': 60, 'TCP_KEEPINTVL': 10}))}"
        f"&client_properties={quote(repr({'product': 'kew-options-test'}))}"
        f"&connection_name={name}"
    )
    c = kew.connect(url)
    assert isinstance(c, kew_rabbitmq.RabbitConnector)
    (params,) = c.options.params
    assert (params.heartbeat, params.frame_max, params.channel_max) == (5, 65536, 100)
    assert (params.socket_timeout, params.stack_timeout) == (3.0, 5.0)
    assert params.tcp_options == {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10}
    assert params.client_properties == {"product": "kew-options-test", "connection_name": name}
    assert params.virtual_host == "/" and c.options.retries == 1
    q = kew.Queue(c, name, int)
    got: list[int] = []
    try:
        with q.sink(got.append) as sub:
            q.send(1)
            wait_for(lambda: got == [1], 20, what="a round trip")
            assert sub._consumer._outbox.frame_max == 65536
    finally:
        c.delete(name)
        c.close()


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("colour=blue", "unknown option(s) colour"),
        ("heartbeat_interval=5", "heartbeat_interval: pika 0.x's name: use heartbeat"),
        ("ssl=true", "use an amqps:// URL"),
        ("frame_max=100", "Min AMQP 0.9.1 Frame Size is 4096"),
        ("channel_max=70000", "channel_max must be <= 65535"),
        ("heartbeat=soon", "option heartbeat='soon'"),
        ("retries=2&connection_attempts=3", "give one of them"),
        ("tcp_options={'TCP_NODELAY':1}", "'TCP_NODELAY' is not one of TCP_KEEPIDLE"),
        ("tcp_options=[1]", "expected a dict literal"),
        ("client_properties={'ratio':1.5}", "'ratio' holds float"),
        ("ssl_options={'ca_certs':'/x.pem'}", "TLS options need an amqps:// URL"),
        ("ca_certs=/x.pem", "TLS options need an amqps:// URL"),
    ],
)
def test_options_kew_does_not_take_are_refused_with_the_list(query: str, words: str) -> None:
    with pytest.raises(kew.ConfigError) as e:
        kew.connect(f"amqp://guest:{PASSWORD}@127.0.0.1/?{query}")
    assert words in str(e.value)
    assert PASSWORD not in str(e.value)
    if "unknown" in words or "pika 0.x" in words:
        assert "the RabbitMQ provider accepts: queue_type, " in str(e.value)
        assert "heartbeat, connection_attempts, retry_delay" in str(e.value)
        assert "ssl_options, tcp_options" in str(e.value)


def test_ssl_options_password_is_masked(tmp_path: Path) -> None:
    secret = f"key-{secrets.token_hex(8)}"
    options = quote(repr({"certfile": str(tmp_path / "missing.pem"), "password": secret}))
    url = f"amqps://guest:{PASSWORD}@127.0.0.1/?ssl_options={options}"
    with pytest.raises(kew.ConfigError, match="TLS files") as e:
        kew.connect(url)
    assert secret not in str(e.value) and "ssl_options=***" in str(e.value)
    with pytest.raises(kew.ConfigError, match="unknown option") as e:
        kew.connect(url + "&nope=1")
    assert secret not in str(e.value) and PASSWORD not in str(e.value)
    with pytest.raises(kew.ConfigError, match="'protocol' is not taken"):
        kew.connect("amqps://127.0.0.1/?ssl_options=" + quote(repr({"protocol": 2})))


def test_ssl_options_on_the_tests_node(rabbitmq_node: RabbitMQServer) -> None:
    """pika's ssl_options (its keys: ca_certs, server_hostname ...) work as
    kew's ca_certs does; giving a file both ways is refused."""
    ca = rabbitmq_node.certs["ca"]
    options = quote(repr({"ca_certs": str(ca)}))
    url = f"amqps://guest:guest@127.0.0.1:{rabbitmq_node.ssl_port}/?ssl_options={options}"
    q = _queue(url, "ssl-options")
    got: list[int] = []
    try:
        with q.sink(got.append):
            q.send(7)
            wait_for(lambda: got == [7], 20, what="the message over TLS")
    finally:
        q.connector.delete("ssl-options")
    with pytest.raises(kew.ConfigError, match="cafile is given twice"):
        kew.connect(f"{url}&ca_certs={ca}")


# -- (6) the first delivery ----------------------------------------------------------------------


def test_the_first_delivery_comes_without_a_start_up_delay() -> None:
    """From ``q.sink(...)`` with a message waiting to the handler's call:
    the I/O thread used to sleep out a 0.2 s poll before consuming.  The
    median of five runs (a latency bound on a shared 2-core machine)."""
    _machine()
    c = kew.connect(MACHINE.format(password="guest", vhost=""))
    name = f"first-{os.urandom(3).hex()}"
    q = kew.Queue(c, name, int)
    times: list[float] = []
    try:
        for i in range(5):
            q.send(i)
            called = threading.Event()
            started = time.monotonic()

            def handle(_: int) -> None:
                times.append(time.monotonic() - started)  # noqa: B023
                called.set()  # noqa: B023

            sub = q.sink(handle)
            try:
                assert called.wait(20)
            finally:
                sub.stop()
    finally:
        c.delete(name)
        c.close()
    assert statistics.median(times) < 0.1, times


# -- (7) delete leaves nothing behind ------------------------------------------------------------


def test_delete_removes_the_delay_queues_it_declared() -> None:
    _machine()
    c = kew.connect(MACHINE.format(password="guest", vhost="") + "?delay_granularity=1000")
    name = f"delete-{os.urandom(3).hex()}"
    q = kew.Queue(c, name, int)
    q.post(1, deliver_at=int(time.time() * 1000) + 60_000)  # to <name>.delay.60000
    consumer = c.consumer(name, 1)
    assert isinstance(consumer, RabbitConsumer)
    try:  # a settle's delayed send declares one too
        due = int(time.time() * 1000) + 120_000
        consumer.settle([], [(name, Message("m", b"2", deliver_at=due))])
    finally:
        consumer.close()
    delays = [f"{name}.delay.60000", f"{name}.delay.120000"]
    assert all(_raw_exists(d) for d in delays)
    c.delete(name)
    for gone in (name, f"{name}.dead", *delays):
        assert not _raw_exists(gone), gone
    c.close()
