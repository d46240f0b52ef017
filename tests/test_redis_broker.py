"""kew_redis against a redis-server of the tests' own: crash, restart, errors."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import kew
from kew.testing.util import require, wait_for
from tests.brokers.redis import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require(RedisServer.available(), "redis-server is not installed")
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.kill()


def test_acknowledged_sends_survive_a_broker_sigkill(server: RedisServer) -> None:
    q = kew.Queue(kew.connect(server.url), "crash", int)
    acked: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            try:
                q.send_many(range(i, i + 20))
            except kew.KewError:
                continue  # the broker is down: send the batch again
            acked.extend(range(i, i + 20))
            i += 20

    t = threading.Thread(target=produce)
    t.start()
    wait_for(lambda: len(acked) >= 400, 30, what="sends before the crash")
    server.restart()  # SIGKILL mid-stream, then up again on the same AOF
    wait_for(lambda: len(acked) >= 1000, 60, what="sends after the crash")
    stop.set()
    t.join(30)
    got: list[int] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        with lock:
            got.append(i)

    consumer_q = kew.Queue(kew.connect(server.url), "crash", int)
    with consumer_q.sink(take, concurrency=2), consumer_q.sink(take, concurrency=2):
        wait_for(lambda: set(acked) <= set(got), 60, what="every acknowledged send")
    assert not set(acked) - set(got)  # nothing acknowledged was lost
    # a pipeline cut by the kill may be sent again whole: at most one batch
    dup = len(got) - len(set(got))
    assert dup <= 20, f"{dup} duplicates from one broker restart"


def test_consumer_resumes_after_broker_restart(server: RedisServer) -> None:
    q = kew.Queue(kew.connect(server.url), "resume", str)
    got: list[str] = []
    with q.sink(got.append):
        q.send("before")
        wait_for(lambda: got == ["before"], 10, what="the first message")
        server.restart()
        q.send("after")
        wait_for(lambda: got == ["before", "after"], 30, what="consumption to resume")


def test_unreachable_broker_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    from kew.testing.util import free_port

    c = kew.connect(f"redis://:hunter2@127.0.0.1:{free_port()}/0?retries=1&socket_timeout=0.5")
    with pytest.raises(kew.BrokerUnavailable) as e:
        kew.Queue(c, "q", int).declare()  # the first operation connects
    assert "is unreachable" in str(e.value) and "hunter2" not in str(e.value)
    assert "hunter2" not in repr(c)


def test_bad_redis_urls() -> None:
    with pytest.raises(kew.ConfigError, match="database number"):
        kew.connect("redis://127.0.0.1/zero")
    with pytest.raises(kew.ConfigError, match="need a rediss:// URL"):
        kew.connect("redis://127.0.0.1/0?ssl_ca_certs=/x.pem")
    with pytest.raises(kew.ConfigError, match="unknown option"):
        kew.connect("redis://127.0.0.1/0?leese=3")
