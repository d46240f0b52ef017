"""kew_rabbitmq batches: pipelined confirms (default) and AMQP transactions
(batch=tx) store every message; a refused batch is a clear SendError."""

import os
import threading

import pytest

import kew
from kew.testing.util import port_open, require, wait_for

URL = "amqp://guest:guest@127.0.0.1/"


@pytest.fixture(autouse=True)
def _broker() -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")


@pytest.mark.parametrize("batch", ["pipeline", "tx"])
def test_send_many_stores_every_message(batch: str) -> None:
    conn = kew.connect(f"{URL}?batch={batch}")
    name = f"batches-{batch}-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, int)
    got: list[int] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        with lock:
            got.append(i)

    try:
        for i in range(0, 1000, 250):
            q.send_many(range(i, i + 250))
        assert q.browser().stats().ready == 1000  # stored when send_many returned
        with q.sink(take, concurrency=4, prefetch=50):
            wait_for(lambda: len(got) >= 1000, 30, what="1000 messages")
        assert sorted(got) == list(range(1000))
    finally:
        conn.delete(name)
        conn.close()


def test_unroutable_batch_is_a_send_error() -> None:
    conn = kew.connect(URL)
    name = f"batches-gone-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, int)
    q.send_many([1, 2])
    conn.delete(name)  # the queue is gone: nothing can route to it
    try:
        with pytest.raises(kew.SendError, match=rf"refused 3 of 3 messages for '{name}'"):
            q.send_many([3, 4, 5])
        with pytest.raises(kew.SendError, match="refused"):
            q.send(6)
    finally:
        conn.delete(name)
        conn.close()


def test_unknown_batch_mode_is_a_config_error() -> None:
    with pytest.raises(kew.ConfigError, match="batch"):
        kew.connect(f"{URL}?batch=sometimes")
