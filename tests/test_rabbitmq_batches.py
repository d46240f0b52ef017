"""kew_rabbitmq batches: pipelined confirms (default) and AMQP transactions
(batch=tx) store every message; a refused batch is a clear SendError."""

import os
import threading
from collections.abc import Iterator

import pytest

import kew
from kew.qchan.spi import Connector, Consumer, Delivery
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


def _ids_on(conn: Connector, queue: str) -> list[str]:
    browser = conn.browser(queue)
    try:
        return [m.id for m in browser.peek(10)]
    finally:
        browser.close()


@pytest.fixture
def settling() -> Iterator[tuple[Connector, str, str]]:
    """A connector, a queue with two messages (t1, t2) and an empty outbox queue."""
    from kew.qchan.spi import Message

    conn = kew.connect(URL)
    name = f"settle-{os.urandom(3).hex()}"
    out = f"{name}.out"
    conn.declare(name)
    conn.declare(out)
    conn.producer(name).send_many([Message("t1", b"one"), Message("t2", b"two")])
    yield conn, name, out
    for q in (name, out):
        conn.delete(q)
    conn.close()


def _take_both(consumer: Consumer) -> dict[str, Delivery]:
    held: dict[str, Delivery] = {}
    wait_for(
        lambda: held.update({d.message.id: d for d in consumer.fetch(2, 1)}) or len(held) == 2,
        10,
        what="t1 and t2",
    )
    return held


def test_settle_to_a_missing_queue_acks_nothing_and_keeps_the_connection(
    settling: tuple[Connector, str, str],
) -> None:
    """Consumer settle (publish on the confirm channel, ack on confirm): a
    send the broker cannot route fails the settle, the delivery is handed
    back and comes again, and the consumer keeps its connection; a good
    settle afterwards stores its message and acks."""
    from kew.qchan.spi import BrokerUnavailable, Message
    from kew_rabbitmq.provider import RabbitConsumer

    conn, name, out = settling
    missing = f"{name}.missing"
    consumer = conn.consumer(name, 4)
    assert isinstance(consumer, RabbitConsumer)
    try:
        held = _take_both(consumer)
        with pytest.raises(BrokerUnavailable, match=rf"no queue for t1x .*{missing}"):
            consumer.settle([held["t1"]], [(missing, Message("t1x", b"x"))])
        again = consumer.fetch(1, 10)  # handed back, not acked
        assert [(d.message.id, d.delivery_count) for d in again] == [("t1", 2)]
        consumer.settle([again[0], held["t2"]], [(out, Message("m2", b"y"))])
        assert _ids_on(conn, out) == ["m2"]
        assert consumer.reconnects == 0
    finally:
        consumer.close()
    # acked: not back on the queue once the consumer is gone
    assert conn.browser(name).stats().ready == 0


def test_settle_async_calls_back_once_confirmed_or_failed(
    settling: tuple[Connector, str, str],
) -> None:
    from kew.qchan.spi import AsyncOutboxConsumer, Message

    conn, name, out = settling
    consumer = conn.consumer(name, 4)
    assert isinstance(consumer, AsyncOutboxConsumer)
    outcomes: dict[str, list[BaseException | None]] = {"ok": [], "bad": []}
    try:
        held = _take_both(consumer)
        consumer.settle_async([held["t1"]], [(out, Message("m1", b"x"))], outcomes["ok"].append)
        consumer.settle_async(
            [held["t2"]], [(f"{name}.missing", Message("m2", b"y"))], outcomes["bad"].append
        )
        wait_for(lambda: outcomes["ok"] and outcomes["bad"], 10, what="both callbacks")
        assert outcomes["ok"] == [None]
        (error,) = outcomes["bad"]
        assert isinstance(error, kew.BrokerUnavailable)
        assert "no queue for m2" in str(error)
        again = consumer.fetch(1, 10)  # the failed one was handed back
        assert [(d.message.id, d.delivery_count) for d in again] == [("t2", 2)]
        consumer.ack(again[0])
        assert _ids_on(conn, out) == ["m1"]
    finally:
        consumer.close()
    assert conn.browser(name).stats().ready == 0
