"""The RabbitMQ provider's native async route (kew_rabbitmq/_aio*.py) on the
machine's RabbitMQ: concurrent sends are pipelined on one confirm channel
and each returns once its own message is confirmed; a refused message fails
only its own send; a fetch waits on the loop and a cancelled one keeps
nothing; a server-side close loses no confirmed send; errors are kew's;
close waits for the sends asked for.  The conformance kit runs through this
route in tests/test_aio_conformance.py (classic and quorum queues)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pika
import pytest

import kew
import kew.aio
from kew.qchan.spi import ConsumerFailed, Message, now_ms
from kew.testing.aio_conformance import eventually
from kew.testing.util import free_port, port_open, require, wait_for
from kew_rabbitmq._aio import RabbitAsyncConnector
from kew_rabbitmq._aio_consumer import RabbitAsyncConsumer
from kew_rabbitmq._consumer import RabbitConsumer
from tests.test_rabbitmq_reconnect import _close_connections

URL = "amqp://guest:guest@127.0.0.1:5672/?delay_granularity=50"


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """Queue names of this test's own, deleted afterwards."""
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    made: list[str] = []

    def name(what: str) -> str:
        made.append(f"aio-{what}-{os.urandom(4).hex()}")
        return made[-1]

    yield name
    c = kew.connect(URL)
    try:
        for queue in made:
            c.delete(queue)
    finally:
        c.close()


def _run(main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


def _native(url: str = URL) -> RabbitAsyncConnector:
    conn = kew.aio.connect(url)
    assert kew.aio.route(conn) == "native"
    assert isinstance(conn, RabbitAsyncConnector)
    return conn


def _ready(queue: str) -> int:
    """The queue's ready messages, as another client sees them."""
    raw = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
    try:
        return int(raw.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        raw.close()


class Ticker:
    """Counts turns of the loop while it runs: a loop blocked by a call
    does not tick."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1


# -- sends ------------------------------------------------------------------------------


def test_a_thousand_concurrent_sends_are_pipelined_and_each_returns_once_confirmed(
    names: Callable[[str], str],
) -> None:
    many, other = names("many"), names("other")

    async def main() -> None:
        conn = _native()
        await conn.declare(many)
        await conn.declare(other)
        producers = {many: await conn.producer(many), other: await conn.producer(other)}
        threads = threading.active_count()
        pub = conn.publisher
        flushes = pub.flushes
        returned = {many: 0, other: 0}
        checked: list[int] = []

        async def send(i: int) -> None:
            queue = many if i % 2 else other
            await producers[queue].send(Message(f"m{i}", b"%d" % i))
            returned[queue] += 1
            if i % 100 == 0:  # confirmed once the await returns: another client counts it
                assert _ready(queue) >= returned[queue]
                checked.append(i)

        await asyncio.gather(*(send(i) for i in range(1000)))
        writes = pub.flushes - flushes
        assert 1 <= writes <= 50, f"{writes} writes for 1,000 concurrent sends"
        assert pub.most_in_flight >= 200, pub.most_in_flight  # confirms awaited together
        assert len(checked) == 10 and _ready(many) == _ready(other) == 500
        # one publishing thread for every send (and the admin thread)
        assert threading.active_count() - threads <= 2
        # send_many, send_to and a delayed send: one write with the rest
        flushes = pub.flushes
        await asyncio.gather(
            producers[many].send_many([Message("a", b"1"), Message("b", b"2")]),
            conn.send_to([(many, Message("c", b"3")), (other, Message("d", b"4"))]),
            producers[other].send(Message("later", b"5", deliver_at=now_ms() + 60_000)),
        )
        assert pub.flushes - flushes == 1
        assert (_ready(many), _ready(other)) == (503, 501)
        assert any(q.startswith(f"{other}.delay.") for q in conn.sync._delay_made)
        await conn.delete(other)  # (and the delay queue this connector declared)
        await conn.close()

    _run(main)


def test_a_refused_message_fails_only_its_own_send(names: Callable[[str], str]) -> None:
    """A message for a queue that does not exist is returned (``mandatory``):
    its send raises SendError; the send beside it is stored."""
    fine, missing = names("fine"), names("missing")

    async def main() -> None:
        conn = _native()
        await conn.declare(fine)
        p = await conn.producer(fine)
        results = await asyncio.gather(
            conn.send_to([(missing, Message("x", b"1"))]),
            p.send(Message("y", b"2")),
            return_exceptions=True,
        )
        assert isinstance(results[0], kew.SendError), results
        assert "x (NO_ROUTE)" in str(results[0]) and repr(missing) in str(results[0])
        assert results[1] is None and _ready(fine) == 1
        flushes = conn.publisher.flushes
        with pytest.raises(kew.MessageTooLarge):  # checked before anything is sent
            await p.send_many(
                [Message("z", b"1"), Message("big", b"x" * (conn.max_message_size + 1))]
            )
        assert conn.publisher.flushes == flushes and _ready(fine) == 1
        await conn.close()

    _run(main)


def test_one_connector_serves_one_loop_after_another(names: Callable[[str], str]) -> None:
    """A connector kept between event loops (kew.task's submit_async keeps
    one): each send resolves on its own loop."""
    queue = names("loops")
    conn = _native()

    async def send(body: bytes) -> None:
        if body == b"1":
            await conn.declare(queue)
        await (await conn.producer(queue)).send(Message(body.decode(), body))

    _run(lambda: send(b"1"))
    _run(lambda: send(b"2"))
    assert _ready(queue) == 2
    _run(conn.close)


def test_close_waits_for_the_sends_asked_for(names: Callable[[str], str]) -> None:
    queue = names("close")

    async def main() -> None:
        conn = _native()
        await conn.declare(queue)
        p = await conn.producer(queue)
        sends = [asyncio.create_task(p.send(Message(f"m{i}", b"x"))) for i in range(300)]
        await asyncio.sleep(0)  # they have asked
        await conn.close()
        assert all(t.done() and t.exception() is None for t in sends)
        assert _ready(queue) == 300
        with pytest.raises(kew.BrokerUnavailable, match="closed"):
            await p.send(Message("late", b"x"))

    _run(main)


# -- fetching ---------------------------------------------------------------------------


def test_a_fetch_waits_on_the_loop_and_a_cancelled_one_keeps_nothing(
    names: Callable[[str], str],
) -> None:
    queue = names("fetch")

    async def main() -> None:
        conn = _native()
        await conn.declare(queue)
        consumer = await conn.consumer(queue, 1)
        assert isinstance(consumer, RabbitAsyncConsumer)
        core = consumer._core
        ticker = Ticker()
        ticking = asyncio.create_task(ticker.run())
        t0 = time.monotonic()
        assert await consumer.fetch(1, 0.5) == []  # nothing: waited on the loop
        assert time.monotonic() - t0 >= 0.5 and ticker.ticks >= 50, ticker.ticks
        ticking.cancel()

        # cancelled while it waits: it has taken nothing
        fetch = asyncio.create_task(consumer.fetch(1, 10))
        await eventually(lambda: core._armed, 5, "the fetch waiting")
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch

        # cancelled once the delivery is in the buffer, before the fetch resumes:
        # the loop is held (no await) until the I/O thread has buffered it
        fetch = asyncio.create_task(consumer.fetch(1, 10))
        await eventually(lambda: core._armed, 5, "the fetch waiting")
        sync = kew.connect(URL)
        sync.producer(queue).send(Message("m1", b"1"))
        # the I/O thread disarms it as it buffers the delivery (polled from
        # this thread: the loop stays held, no await)
        wait_for(lambda: not core._armed, 10, 0.005, what="the delivery buffered")
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        (d,) = await consumer.fetch(1, 5)  # the next fetch has it: first delivery
        assert (d.message.id, d.delivery_count) == ("m1", 1)
        await consumer.release(d)
        (again,) = await consumer.fetch(1, 5)
        assert (again.message.id, again.delivery_count) == ("m1", 2)
        await consumer.dead_letter(again, "not wanted")
        await consumer.dead_letter(again, "twice: a no-op")
        await consumer.close()
        dead = await (await conn.browser(queue)).dead_letters(10)
        assert [(x.message.id, x.reason, x.delivery_count) for x in dead] == [
            ("m1", "not wanted", 2)
        ]
        sync.close()
        await conn.close()

    _run(main)


# -- failures ---------------------------------------------------------------------------


def test_a_server_side_close_loses_no_confirmed_send(names: Callable[[str], str]) -> None:
    """rabbitmqctl closes every connection of this test (the publisher's,
    the consumer's) while sends and an async sink run: both reconnect, and
    every send that returned is consumed."""
    require(
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode == 0,
        "rabbitmqctl cannot reach the local node",
    )
    tag = f"kew-aio-{os.urandom(4).hex()}"
    queue = names("cut")

    async def main() -> None:
        conn = _native(f"{URL}&connection_name={tag}")
        q = kew.aio.Queue(conn, queue, int)
        got: set[int] = set()
        confirmed: list[int] = []
        stop = asyncio.Event()

        async def take(i: int) -> None:
            got.add(i)

        async def produce() -> None:
            i = 0
            while not stop.is_set():
                try:
                    await asyncio.gather(*(q.send(i + k) for k in range(20)))
                except kew.KewError:
                    continue  # not all confirmed: send them again
                confirmed.extend(range(i, i + 20))
                i += 20

        async with q.sink(take, concurrency=4) as sub:
            producer = asyncio.create_task(produce())
            await eventually(lambda: len(got) >= 200, 30, "consumption before the cut")
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, _close_connections, tag) >= 2
            n = len(confirmed)
            await eventually(lambda: len(confirmed) >= n + 200, 60, "sends after the cut")
            stop.set()
            await producer
            await eventually(lambda: set(confirmed) <= got, 60, "every confirmed message")
            assert sub._consumer is not None
            assert sub._consumer.reconnects >= 1  # type: ignore[attr-defined]
        assert conn.publisher.connections >= 2
        await conn.close()

    _run(main, timeout=120)


def test_errors_are_kews_and_the_loop_goes_on(
    names: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = names("errors")
    monkeypatch.setattr(RabbitConsumer, "GONE_AFTER", 0.5)  # (5 s: not waited for here)

    async def main() -> None:
        ticker = Ticker()
        ticking = asyncio.create_task(ticker.run())
        refused = _native("amqp://guest:wrong@127.0.0.1:5672/?retries=0")
        with pytest.raises(kew.AccessRefused, match="guest"):
            await (await refused.producer(queue)).send(Message("m", b"1"))
        with pytest.raises(kew.AccessRefused):
            await refused.consumer(queue, 1)
        await refused.close()
        gone = _native(f"amqp://guest:guest@127.0.0.1:{free_port()}/?retries=1")
        with pytest.raises(kew.BrokerUnavailable, match="unreachable"):
            await (await gone.producer(queue)).send(Message("m", b"1"))
        with pytest.raises(kew.BrokerUnavailable):
            await gone.consumer(queue, 1)
        await gone.close()
        conn = _native()  # a consumer of a queue that does not exist fails
        with pytest.raises(ConsumerFailed, match="NOT_FOUND"):
            await conn.consumer(queue, 1)
        await conn.close()
        assert ticker.ticks >= 100, ticker.ticks  # the loop went on meanwhile
        ticking.cancel()

    _run(main)
