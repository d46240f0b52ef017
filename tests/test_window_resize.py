"""A consumer's window changed while it runs (``WindowedConsumer.set_prefetch``)
on the machine's RabbitMQ, classic and quorum queues: the broker pushes at most
the new window from then on, what was delivered before stays held and ackable,
and under load with many resizes nothing is lost, handed out twice or marked
redelivered (settles waiting for their confirms included).

STOMP has no such route (UNSUBSCRIBE gives back, or strands, what the
subscription holds): its consumer is not a ``WindowedConsumer``."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

import kew
from kew.qchan.spi import Connector, Delivery, Message, WindowedConsumer
from kew.testing.util import port_open, require, wait_for
from kew_artemis.provider import StompConsumer
from kew_rabbitmq._consumer import RabbitConsumer

URL = "amqp://guest:guest@127.0.0.1:5672/"
#: The longest a delivery may take to come once the window has room, and how
#: long the broker is watched to push nothing more.
COME, QUIET = 10.0, 0.3


@pytest.fixture(params=["classic", "quorum"])
def url(request: pytest.FixtureRequest) -> str:
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    return f"{URL}?queue_type={request.param}"


@pytest.fixture
def conn(url: str) -> Iterator[Connector]:
    c = kew.connect(url)
    yield c
    c.close()


def _queue(conn: Connector, name: str) -> Iterator[str]:
    q = f"resize-{name}-{os.urandom(3).hex()}"
    conn.declare(q)
    try:
        yield q
    finally:
        conn.delete(q)


@pytest.fixture
def queue(conn: Connector) -> Iterator[str]:
    yield from _queue(conn, "q")


def _fill(conn: Connector, queue: str, n: int, start: int = 0) -> None:
    p = conn.producer(queue)
    for i in range(start, start + n, 500):
        p.send_many([Message(f"m{j}", b"x") for j in range(i, min(i + 500, start + n))])
    p.close()


class _Taker:
    """Fetches from a consumer and keeps what is held (not settled yet)."""

    def __init__(self, consumer: WindowedConsumer) -> None:
        self.c = consumer
        self.held: list[Delivery] = []
        self.seen: Counter[str] = Counter()
        self.counts: Counter[int] = Counter()

    def take(self, n: int) -> None:
        """Exactly ``n`` more deliveries come, and then nothing within QUIET s."""
        want = len(self.held) + n

        def more() -> bool:
            for d in self.c.fetch(want - len(self.held), 0.05):  # type: ignore[attr-defined]
                self.held.append(d)
                self.seen[d.message.id] += 1
                self.counts[d.delivery_count] += 1
            return len(self.held) >= want

        wait_for(more, COME, interval=0, what=f"{n} deliveries")
        extra = self.c.fetch(1000, QUIET)  # type: ignore[attr-defined]
        assert not extra, f"{len(extra)} beyond the window ({want} held)"

    def ack(self, n: int | None = None) -> None:
        """Ack the ``n`` held longest (all by default)."""
        n = len(self.held) if n is None else n
        for d in self.held[:n]:
            self.c.ack(d)  # type: ignore[attr-defined]
        del self.held[:n]


def test_the_broker_pushes_the_new_window_and_the_old_deliveries_stay_ackable(
    conn: Connector, queue: str
) -> None:
    _fill(conn, queue, 400)
    consumer = conn.consumer(queue, 1)
    assert isinstance(consumer, WindowedConsumer)
    t = _Taker(consumer)
    try:
        t.take(1)
        consumer.set_prefetch(64)
        t.take(64)  # the old consumer's one is still held: 64 on top of it
        t.ack()
        t.take(64)  # 64 settled: 64 more, not more
        consumer.set_prefetch(4)
        t.take(4)  # on top of the 64 held, which the new window does not count
        t.ack(64)  # the old consumer's deliveries are acked after its cancel ...
        assert not consumer.fetch(10, QUIET)  # ... and make no room: 4 of 4 held
        t.ack()
        t.take(4)
        consumer.set_prefetch(10)
        t.take(10)  # grows: 10 on top of the 4 held
        t.ack()
        t.take(10)
        consumer.set_prefetch(128)
        t.take(128)  # on top of the 10 held
        t.ack()
        t.take(400 - 1 - 64 - 64 - 4 - 4 - 10 - 10 - 128)  # the rest
        t.ack()
    finally:
        consumer.close()
    assert len(t.seen) == 400 and set(t.seen.values()) == {1}
    assert t.counts == {1: 400}  # none delivered again (no redelivered flag)
    b = conn.browser(queue)
    wait_for(lambda: b.stats().ready == 0, 10, what="every ack on the broker")
    b.close()


def test_many_resizes_under_load_lose_and_repeat_nothing(
    conn: Connector, queue: str, request: pytest.FixtureRequest
) -> None:
    """5,000 messages (4,000 waiting, 1,000 sent meanwhile), one settle in
    five with a message to another queue (acked on its confirm), and a resize
    every few ms while the queue holds more than the largest window: on a
    quorum queue a resize waits for the consumer to have no credit left (else
    what is on its way to the consumer is returned to the queue, marked
    redelivered), which a queue with less waiting cannot be sure of."""
    total, waiting, windows = 5000, 4000, [1, 64, 4, 128, 1, 32, 2, 100, 8]
    out = f"{queue}.out"
    conn.declare(out)
    _fill(conn, queue, waiting)
    consumer = conn.consumer(queue, 1)
    assert isinstance(consumer, WindowedConsumer)
    seen: Counter[str] = Counter()
    counts: Counter[int] = Counter()
    fetched = [0]
    sent = [waiting]
    errors: list[BaseException | None] = []
    settles = [0]
    costs: list[float] = []
    stop = threading.Event()

    def produce() -> None:
        p = conn.producer(queue)
        for i in range(waiting, total, 250):
            p.send_many([Message(f"m{j}", b"x") for j in range(i, i + 250)])
            sent[0] = i + 250
        p.close()

    def resize() -> None:
        i = 0
        while not stop.is_set():
            if sent[0] - fetched[0] < 1000:  # too little waiting: see the docstring
                stop.wait(0.005)
                continue
            start = time.perf_counter()
            consumer.set_prefetch(windows[i % len(windows)])
            costs.append(time.perf_counter() - start)
            i += 1
            stop.wait(0.005)

    threads = [threading.Thread(target=produce), threading.Thread(target=resize)]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 120
        while len(seen) < total and time.monotonic() < deadline:
            for d in consumer.fetch(256, 0.2):
                seen[d.message.id] += 1
                counts[d.delivery_count] += 1
                fetched[0] += 1
                if fetched[0] % 5:
                    consumer.ack(d)
                    continue
                settles[0] += 1
                copy = Message(f"out-{d.message.id}", b"y")
                consumer.settle_async([d], [(out, copy)], errors.append)  # type: ignore[attr-defined]
        stop.set()
        for th in threads:
            th.join(30)
        wait_for(lambda: len(errors) == settles[0], 30, what="every settle's confirms")
    finally:
        stop.set()
        consumer.close()
    assert len(seen) == total and set(seen.values()) == {1}, "lost or handed out twice"
    assert counts == {1: total}, f"delivered again: {counts}"
    assert errors == [None] * settles[0]
    assert len(costs) >= 20, f"only {len(costs)} resizes"
    b, bo = conn.browser(queue), conn.browser(out)
    wait_for(lambda: b.stats().ready == 0, 10, what="every ack on the broker")
    assert bo.stats().ready == settles[0]  # each settle's message stored once
    b.close()
    bo.close()
    conn.delete(out)
    ms = sorted(c * 1000 for c in costs)
    print(
        f"\n{request.node.callspec.id}: {len(costs)} resizes, ms per resize: median "
        f"{statistics.median(ms):.1f}, p90 {ms[len(ms) * 9 // 10]:.1f}, max {ms[-1]:.1f}"
    )


def _close_connection(name: str) -> None:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pids = [line.split()[0] for line in out.splitlines() if name in line]
    assert pids, f"no connection named {name}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "close_connection", pid, "kew resize test"], check=True)


def test_a_new_connection_consumes_with_the_current_window() -> None:
    """(Classic only: subscribing is the same for both.)"""
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    require(
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode == 0,
        "rabbitmqctl cannot reach the local node",
    )
    url = f"{URL}?connection_name=kew-resize-{os.urandom(4).hex()}"
    conn = kew.connect(url)
    queue = f"resize-reconnect-{os.urandom(3).hex()}"
    conn.declare(queue)
    _fill(conn, queue, 100)
    consumer = conn.consumer(queue, 2)
    assert isinstance(consumer, WindowedConsumer)
    t = _Taker(consumer)
    try:
        t.take(2)
        consumer.set_prefetch(7)
        t.take(7)
        _close_connection(url.rsplit("=", 1)[1])
        wait_for(lambda: consumer.reconnects >= 1, 30, what="a reconnect")  # type: ignore[attr-defined]
        t.held.clear()  # the lost connection's: the broker hands them out again
        t.take(7)
        t.ack()
    finally:
        consumer.close()
        conn.delete(queue)
        conn.close()


def test_resizes_racing_close_return(conn: Connector, queue: str) -> None:
    _fill(conn, queue, 50)
    consumer = conn.consumer(queue, 4)
    assert isinstance(consumer, WindowedConsumer)
    with pytest.raises(ValueError, match="prefetch"):
        consumer.set_prefetch(0)
    done = threading.Event()

    def resize() -> None:
        n = 1
        while not done.is_set():
            consumer.set_prefetch(n % 50 + 1)
            n += 1

    threads = [threading.Thread(target=resize) for _ in range(2)]
    for th in threads:
        th.start()
    assert consumer.fetch(10, COME)
    consumer.close()  # while resizing
    done.set()
    for th in threads:
        th.join(5)
    assert not any(th.is_alive() for th in threads), "set_prefetch hangs after close"
    start = time.monotonic()
    consumer.set_prefetch(9)  # closed: returns at once
    assert time.monotonic() - start < 1
    b = conn.browser(queue)
    wait_for(lambda: b.stats().ready == 50, 10, what="the unsettled handed back")
    b.close()


def test_which_consumers_have_a_window_that_changes() -> None:
    """UNSUBSCRIBE hands back (ActiveMQ: redelivered at once) or strands
    (RabbitMQ-STOMP: its ACKs are refused until the connection ends) what
    the subscription holds, so STOMP cannot resize a subscription."""
    assert issubclass(RabbitConsumer, WindowedConsumer)
    assert not issubclass(StompConsumer, WindowedConsumer)
