"""What a user sees when a Redis URL is wrong, against real servers: a kew
error (never redis-py's) at the first operation, with Redis's words, the
password masked, and no retrying of what retrying cannot fix."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import kew
import kew_redis  # imported here, so that the timings below measure no import
from kew.qchan.spi import ConsumerFailed
from kew.testing.util import free_port, port_open, require, wait_for

PASSWORD = "s3cret-Pa55"
TLS_ONLY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


def _queue(url: str) -> kew.Queue[int]:
    """``kew.connect`` and ``kew.Queue`` only read the URL: they never raise
    for what the server says (see the last tests)."""
    return kew.Queue(kew.connect(url), "errors", int)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own, with a password (stopped by pid)."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    port = free_port()
    log = (tmp_path / "redis.log").open("ab")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    proc = subprocess.Popen(
        ["redis-server", *args, "--requirepass", PASSWORD], stdout=log, stderr=log
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 20, what="redis-server")
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


def _machine_redis() -> None:
    require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")


# -- (1) a database that does not exist ------------------------------------------


def test_a_database_out_of_range_is_a_config_error_at_the_first_operation() -> None:
    _machine_redis()
    q = _queue("redis://127.0.0.1:6379/99")  # retries=10: none may happen
    e, took = _timed(q.declare)
    assert isinstance(e, kew.ConfigError), repr(e)
    assert "database 99" in str(e) and "DB index is out of range" in str(e)
    assert isinstance(e.__cause__, redis.ResponseError)
    assert took < 1.0  # not retried
    e, _ = _timed(lambda: q.send(1))
    assert isinstance(e, kew.ConfigError)


# -- (2) refused credentials and permissions --------------------------------------------


def test_a_wrong_password_is_refused_at_once_and_masked(own_redis: int) -> None:
    q = _queue(f"redis://:wrong-{PASSWORD}@127.0.0.1:{own_redis}/0")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 2.0  # final: not ~13 s of reconnecting
    assert "refused" in str(e) and "***" in str(e)
    assert PASSWORD not in str(e) and PASSWORD not in repr(q.connector)
    assert isinstance(e.__cause__, redis.AuthenticationError)
    e, took = _timed(lambda: q.send(1))
    assert isinstance(e, kew.AccessRefused) and took < 2.0
    # no password at all, and a user that does not exist: refused alike
    for url in (
        f"redis://127.0.0.1:{own_redis}/0",
        f"redis://nobody:{PASSWORD}@127.0.0.1:{own_redis}/0",
    ):
        e, took = _timed(_queue(url).declare)
        assert isinstance(e, kew.AccessRefused) and took < 2.0, repr(e)
        assert PASSWORD not in str(e)
        assert "'nobody'" in str(e) or "'default'" in str(e)
    # the right password works
    ok = _queue(f"redis://:{PASSWORD}@127.0.0.1:{own_redis}/0")
    ok.send(7)
    assert ok.browser().stats().ready == 1


def test_an_acl_user_without_the_permission_is_refused(own_redis: int) -> None:
    admin = redis.Redis(port=own_redis, password=PASSWORD)
    # may read and connect, not write: declaring (XGROUP CREATE) is refused
    admin.acl_setuser(
        "reader", enabled=True, passwords=["+readerpw"], keys=["*"], categories=["+@all", "-@write"]
    )
    admin.close()
    q = _queue(f"redis://reader:readerpw@127.0.0.1:{own_redis}/0")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 2.0
    assert "refused user 'reader'" in str(e) and "xgroup" in str(e)
    assert "readerpw" not in str(e)
    assert isinstance(e.__cause__, redis.exceptions.NoPermissionError)


def test_a_refused_consumer_fails_its_subscription(own_redis: int) -> None:
    """A sink whose credentials are refused fails at start, with the error."""
    q = _queue(f"redis://:nope@127.0.0.1:{own_redis}/0")
    with pytest.raises(kew.AccessRefused), q.sink(lambda i: None):
        pass


def test_a_running_consumer_whose_password_is_changed_fails_for_good(own_redis: int) -> None:
    """Refused on reconnect: the fetch raises ConsumerFailed (its cause the
    AccessRefused), the subscription is no longer alive, nothing retries."""
    q = _queue(f"redis://:{PASSWORD}@127.0.0.1:{own_redis}/0?retries=2")
    got: list[int] = []
    with q.sink(got.append) as sub:
        q.send(1)
        wait_for(lambda: got == [1], 10, what="the first message")
        admin = redis.Redis(port=own_redis, password=PASSWORD)
        admin.config_set("requirepass", "changed")
        admin.client_kill_filter(_type="normal", skipme=True)  # every connection reconnects
        admin.close()
        wait_for(lambda: not sub.alive, 10, what="the subscription to fail")
        assert isinstance(sub.error, ConsumerFailed)
        assert isinstance(sub.error.__cause__, kew.AccessRefused)
        assert "refused" in str(sub.error) and PASSWORD not in str(sub.error)


# -- (3) a server that speaks another protocol ----------------------------------------


class _Listener:
    """A tiny TCP server of another protocol: it greets (SMTP) or answers
    whatever it is sent (HTTP), then hangs up."""

    def __init__(self, greeting: bytes | None, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.1)
        self.greeting, self.reply = greeting, reply
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if self.greeting:
                        conn.sendall(self.greeting)
                    conn.recv(4096)
                    if self.reply:
                        conn.sendall(self.reply)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(4096)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize(
    ("greeting", "reply", "said"),
    [
        (None, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 400"),
        (b"220 mail.example.org ESMTP ready\r\n", b"502 unknown command\r\n", "220 mail"),
    ],
    ids=["http", "smtp"],
)
def test_a_server_of_another_protocol_is_unavailable_at_once(
    greeting: bytes | None, reply: bytes, said: str
) -> None:
    server = _Listener(greeting, reply)
    try:
        q = _queue(f"redis://127.0.0.1:{server.port}/0?socket_timeout=2")  # retries=10
        e, took = _timed(q.declare)
        assert isinstance(e, kew.BrokerUnavailable), repr(e)
        assert took < 2.0  # within the connect timeout: a protocol error is not retried
        assert "does not speak the Redis protocol" in str(e) and said in str(e)
        assert isinstance(e.__cause__, redis.exceptions.InvalidResponse)
    finally:
        server.close()


def test_the_amqp_port_is_unavailable() -> None:
    """RabbitMQ hangs up on a Redis client (it resets the connection, so
    no reply can be read and named): a lost connection, retried, then
    unavailable."""
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    q = _queue("redis://127.0.0.1:5672/0?retries=1&socket_timeout=2")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert "after 2 attempt(s)" in str(e) and took < 10.0  # 2 x socket_timeout at most
    assert isinstance(e.__cause__, redis.ConnectionError | redis.TimeoutError)


# -- (4) nobody listening ------------------------------------------------------------------


def test_a_closed_port_is_unavailable_after_the_documented_retries() -> None:
    port = free_port()
    q = _queue(f"redis://:{PASSWORD}@127.0.0.1:{port}/0?retries=3")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert "is unreachable after 4 attempt(s)" in str(e) and "Connection refused" in str(e)
    assert PASSWORD not in str(e) and isinstance(e.__cause__, redis.ConnectionError)
    # Backoff: 0.1 s doubling, each delay at least half its base (jitter)
    assert 0.35 <= took < 5.0
    e, took = _timed(lambda: q.send(1))
    assert isinstance(e, kew.BrokerUnavailable) and "4 attempt(s)" in str(e)
    once = _queue(f"redis://127.0.0.1:{port}/0?retries=0")
    e, took = _timed(once.declare)
    assert isinstance(e, kew.BrokerUnavailable) and "after 1 attempt(s)" in str(e)
    assert took < 0.5


def _construct(url: str) -> float:
    started = time.monotonic()
    kew.Queue(kew.connect(url), "first", int)
    return time.monotonic() - started


def test_every_error_comes_at_the_first_operation_never_at_construction() -> None:
    """kew.connect() and kew.Queue() do no network I/O: with a closed port
    and the default 10 retries, any would take seconds.  (The best of three
    runs is timed: this 2-core machine is shared by other tests.)"""
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    assert min(_construct(url) for _ in range(3)) < 0.1
    c = kew.connect(url.replace("/0", "/0?retries=0"))
    assert isinstance(c, kew_redis.RedisConnector)
    q = kew.Queue(c, "first", int)
    browser = c.browser("first")  # nor do a browser and a producer
    c.producer("first")
    with pytest.raises(kew.BrokerUnavailable):
        browser.stats()
    with pytest.raises(kew.BrokerUnavailable):
        q.send(1)
    with pytest.raises(kew.BrokerUnavailable):
        c.dedupe_store("ns").state("k")


def test_bad_options_are_config_errors_listing_what_is_accepted() -> None:
    with pytest.raises(kew.ConfigError) as e:
        kew.connect("redis://127.0.0.1/0?protocol=3&bogus=1")
    text = str(e.value)
    assert "unknown option(s) bogus, protocol" in text and "kew reads RESP2 replies" in text
    for name in ("prefix", "lease", "health_check_interval", "socket_keepalive", "ssl_ca_certs"):
        assert name in text.split("accepts:")[1]
    with pytest.raises(kew.ConfigError, match="need a rediss:// URL"):
        kew.connect("redis://127.0.0.1/0?" + "&".join(f"{n}=/x.pem" for n in TLS_ONLY))
    with pytest.raises(kew.ConfigError, match="two database numbers"):
        kew.connect("redis://127.0.0.1/1?db=2")
    with pytest.raises(kew.ConfigError, match="given twice"):
        kew.connect("redis://:pw@127.0.0.1/0?password=pw2")
    with pytest.raises(kew.ConfigError, match="client_name"):
        kew.connect("redis://127.0.0.1/0?client_name=two%20words")
    with pytest.raises(kew.ConfigError, match="socket file and no host"):
        kew.connect("unix://localhost/tmp/redis.sock")
    with pytest.raises(kew.ConfigError) as e:  # a TLS key's password is masked too
        kew.connect(f"rediss://h/0?ssl_password={PASSWORD}&lease=soon")
    assert PASSWORD not in str(e.value) and "ssl_password=***" in str(e.value)
