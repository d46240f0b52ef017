"""What a user sees when a STOMP URL is wrong, against real servers: a kew
error (never stomp.py's) at the first operation, with the broker's words,
the passcode masked, and no retrying of what retrying cannot fix.

Refusals run on RabbitMQ's STOMP plugin (61613) and on an ActiveMQ of this
module's own that checks logins (the tests' shared ActiveMQ takes any
login: its config has no authentication plugin)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kew
import kew_artemis  # imported here, so that the timings below measure no import
import tests.brokers.activemq as activemq_module
from kew.qchan.spi import ConsumerFailed
from kew.testing.util import free_port, port_open, require, wait_for
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp

RABBIT = "stomp://{login}@127.0.0.1:61613/?dialect=rabbitmq"
PASSCODE = "s3cret-Pa55"


def _timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


def _queue(url: str) -> kew.Queue[int]:
    """``kew.connect`` and ``kew.Queue`` only read the URL: they never raise
    for what the server says (see the last test)."""
    return kew.Queue(kew.connect(url), "errors", int)


# -- an ActiveMQ that checks logins --------------------------------------------------

_PLUGIN = """
    <plugins>
      <!-- anonymous access stays allowed: ActiveMQServer.verify connects without a login -->
      <simpleAuthenticationPlugin anonymousAccessAllowed="true">
        <users>
          <authenticationUser username="kew" password="{password}" groups="users"/>
        </users>
      </simpleAuthenticationPlugin>
    </plugins>
    <persistenceAdapter>"""


class SecuredActiveMQ(ActiveMQServer):
    """The tests' ActiveMQ config plus a simpleAuthenticationPlugin with one
    user, ``kew``, whose password is :attr:`password` (change it, then
    :meth:`restart`: the broker checks logins against the new one)."""

    def __init__(self, workdir: Path, password: str) -> None:
        super().__init__(workdir)
        self.password = password

    def start(self) -> None:
        config = self.dir / "conf" / "activemq.xml"
        config.parent.mkdir(exist_ok=True)
        shared = activemq_module.CONFIG.read_text()
        assert shared.count("<persistenceAdapter>") == 1
        config.write_text(
            shared.replace("<persistenceAdapter>", _PLUGIN.format(password=self.password))
        )
        # ActiveMQServer.start reads its config path from the module
        saved, activemq_module.CONFIG = activemq_module.CONFIG, config
        try:
            super().start()
        finally:
            activemq_module.CONFIG = saved

    def login_url(self, password: str, extra: str = "") -> str:
        return f"stomp://kew:{password}@127.0.0.1:{self.port}/?dialect=activemq{extra}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredActiveMQ]:
    require(ActiveMQServer.available(), "ActiveMQ (Debian package activemq) is not installed")
    server = SecuredActiveMQ(tmp_path_factory.mktemp("secured-activemq"), PASSCODE)
    try:
        server.start()
        yield server
    finally:
        server.kill()


# -- (1) refused logins -------------------------------------------------------------


def test_a_wrong_passcode_is_refused_at_once_and_masked() -> None:
    require_rabbitmq_stomp()
    wrong = f"wrong-{PASSCODE}"
    q = _queue(RABBIT.format(login=f"guest:{wrong}"))  # retries=10: none may happen
    e, took = _timed(q.declare)
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 2.0  # final: not rounds of reconnecting
    assert "refused the login (user 'guest'" in str(e) and "Access refused" in str(e)
    assert "guest:***@" in str(e) and wrong not in str(e) and wrong not in repr(q.connector)
    e, took = _timed(lambda: q.send(1))
    assert isinstance(e, kew.AccessRefused) and took < 2.0
    e, took = _timed(lambda: q.browser().stats())
    assert isinstance(e, kew.AccessRefused) and took < 2.0
    # a user that does not exist: refused alike
    e, took = _timed(_queue(RABBIT.format(login=f"nobody:{wrong}")).declare)
    assert isinstance(e, kew.AccessRefused) and took < 2.0, repr(e)
    assert "user 'nobody'" in str(e) and wrong not in str(e)
    # the right passcode works
    ok = _queue(RABBIT.format(login="guest:guest"))
    ok.declare()


def test_an_unknown_virtual_host_is_refused_at_once() -> None:
    """RabbitMQ reads the CONNECT frame's host header as its virtual host:
    one it does not have is refused, as is the host name another dialect
    sends there (the URL forgot dialect=rabbitmq)."""
    require_rabbitmq_stomp()
    for url, vhost in [
        (RABBIT.format(login="guest:guest") + "&vhost=/nowhere", "/nowhere"),
        ("stomp://guest:guest@127.0.0.1:61613/", "127.0.0.1"),  # dialect artemis
    ]:
        e, took = _timed(_queue(url).declare)
        assert isinstance(e, kew.AccessRefused), repr(e)
        assert took < 2.0
        assert f"virtual host {vhost!r}" in str(e)
        assert f"Virtual host '{vhost}' access denied" in str(e)


def test_a_refused_consumer_fails_at_start() -> None:
    """A sink whose login is refused raises at once, with the error."""
    require_rabbitmq_stomp()
    q = _queue(RABBIT.format(login="guest:nope"))
    e, took = _timed(lambda: q.sink(lambda i: None))
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 5.0 and "nope" not in str(e)
    # the provider's consumer itself (the sink declares the queue first)
    e, took = _timed(lambda: q.connector.consumer("errors", 1))
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 5.0 and "cannot consume from 'errors'" in str(e) and "nope" not in str(e)


def test_activemq_refuses_a_wrong_password_at_once(secured: SecuredActiveMQ) -> None:
    wrong = f"not-{secured.password}"
    e, took = _timed(_queue(secured.login_url(wrong)).declare)
    assert isinstance(e, kew.AccessRefused), repr(e)
    assert took < 5.0
    assert "User name [kew] or password is invalid" in str(e) and wrong not in str(e)
    ok = _queue(secured.login_url(secured.password))
    ok.declare()


def test_a_running_consumer_refused_on_reconnect_fails_for_good(
    secured: SecuredActiveMQ,
) -> None:
    """The password changes while a consumer runs: when its connection
    drops (the broker restarts with the new password) its reconnect is
    refused, and that is final: fetch raises ConsumerFailed (its cause the
    AccessRefused), the subscription is no longer alive, nothing retries."""
    old = secured.password
    q = _queue(secured.login_url(old, "&retries=3"))
    name = f"refused-{os.urandom(3).hex()}"
    q = kew.Queue(q.connector, name, int)
    got: list[int] = []
    with q.sink(got.append) as sub:
        q.send(1)
        wait_for(lambda: got == [1], 20, what="the first message")
        secured.password = f"changed-{os.urandom(3).hex()}"
        secured.restart()  # every connection drops; logins now need the new password
        wait_for(lambda: not sub.alive, 120, what="the subscription to fail")
        assert isinstance(sub.error, ConsumerFailed), repr(sub.error)
        assert isinstance(sub.error.__cause__, kew.AccessRefused)
        assert "refused its login when it reconnected" in str(sub.error)
        assert "password is invalid" in str(sub.error) and old not in str(sub.error)
    # the new password works (message 1 may come again: SIGKILL may have beaten its ACK)
    fresh = kew.Queue(kew.connect(secured.login_url(secured.password)), name, int)
    again: list[int] = []
    with fresh.sink(again.append):
        fresh.send(2)
        wait_for(lambda: 2 in again, 20, what="a message with the new password")
    assert set(again) <= {1, 2}
    fresh.connector.delete(name)


# -- (2) a server that speaks another protocol ------------------------------------------


@pytest.mark.parametrize(
    ("port", "said", "what"),
    [
        (6379, "-ERR unknown command", "a Redis server"),
        (5672, r"b'AMQP\x00\x00\t\x01'", "an AMQP server"),
    ],
    ids=["redis", "amqp"],
)
def test_a_port_of_another_protocol_is_unavailable_at_once(port: int, said: str, what: str) -> None:
    """The machine's Redis and RabbitMQ's AMQP port answer a CONNECT frame
    with bytes of their own protocol: named at once, not retried (retries
    is 10) nor waited for until connect_timeout (5 s here)."""
    require(port_open("127.0.0.1", port), f"nothing listens on 127.0.0.1:{port}")
    url = f"stomp://guest:{PASSCODE}@127.0.0.1:{port}/?dialect=rabbitmq&connect_timeout=5"
    for _ in range(3):  # the AMQP port resets the connection as it answers: every time alike
        e, took = _timed(_queue(url).declare)
        assert isinstance(e, kew.BrokerUnavailable), repr(e)
        assert took < 5.0
        assert f"127.0.0.1:{port} does not speak STOMP" in str(e)
        assert said in str(e) and what in str(e)
        assert PASSCODE not in str(e)  # Redis echoes the CONNECT frame's lines


def test_a_plain_stomp_port_is_not_spoken_to_with_tls() -> None:
    require_rabbitmq_stomp()
    url = "stomp+ssl://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&retries=1&connect_timeout=5"
    e, took = _timed(_queue(url).declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert "TLS failed" in str(e) and took < 10.0


# -- (3) nobody listening ----------------------------------------------------------------


def test_a_closed_port_is_unavailable_after_the_documented_retries() -> None:
    port = free_port()
    q = _queue(f"stomp://guest:{PASSCODE}@127.0.0.1:{port}/?retries=3")
    e, took = _timed(q.declare)
    assert isinstance(e, kew.BrokerUnavailable), repr(e)
    assert f"is unreachable: 127.0.0.1:{port}: [Errno 111] Connection refused" in str(e)
    assert "(4 round(s) over 1 host(s) in " in str(e) and PASSCODE not in str(e)
    # Backoff: 0.1 s doubling, each delay at least half its base (jitter)
    assert 0.35 <= took < 10.0
    once = _queue(f"stomp://127.0.0.1:{port}/?retries=0")
    e, took = _timed(lambda: once.send(1))
    assert isinstance(e, kew.BrokerUnavailable) and "(1 round(s)" in str(e)
    assert took < 1.0


def _construct(url: str) -> float:
    started = time.monotonic()
    kew.Queue(kew.connect(url), "first", int)
    return time.monotonic() - started


def test_every_error_comes_at_the_first_operation_never_at_construction() -> None:
    """kew.connect() and kew.Queue() do no network I/O: with a closed port
    and the default 10 retries, any would take seconds.  (The best of three
    runs is timed: this 2-core machine is shared by other tests.)"""
    port = free_port()
    url = f"stomp://guest:{PASSCODE}@127.0.0.1:{port}/"
    assert min(_construct(url) for _ in range(3)) < 0.1
    c = kew.connect(url + "?retries=0")
    assert isinstance(c, kew_artemis.StompConnector)
    q = kew.Queue(c, "first", int)
    browser = c.browser("first")  # nor do a browser and a producer
    c.producer("first")
    with pytest.raises(kew.BrokerUnavailable):
        browser.stats()
    with pytest.raises(kew.BrokerUnavailable):
        q.send(1)
