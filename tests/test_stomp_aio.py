"""The STOMP provider's native async route (``StompConnector.aio()``): the
async conformance kit on the tests' ActiveMQ (RabbitMQ's STOMP plugin runs
it in tests/test_aio_conformance.py), receipts in flight on one connection
seen from a raw stomp.py client, the loop kept free while a broker does not
answer, connections cut under async producers and consumers losing
nothing that was awaited, acks and dead letters on the broker after close,
a fetch woken without polling, and a connector across os.fork."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import pytest
import stomp

import kew.aio
from kew.qchan.spi import BrokerUnavailable, Message
from kew.testing.aio_conformance import AsyncProviderConformance
from kew_artemis._aio import StompAsyncConnector
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp

RABBIT = "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq"


class TestActiveMQAsync(AsyncProviderConformance):
    expected_route = "native"
    crash_redelivery_timeout = 30.0
    browse_lists_held = True  # a browser:true subscription lists a message a handler holds

    @pytest.fixture
    def url(self, activemq: ActiveMQServer) -> str:
        return f"stomp://127.0.0.1:{activemq.port}/?dialect=activemq&max_message_size=1048576"


@pytest.fixture(params=["activemq", "rabbitmq"])
def stomp_url(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        require_rabbitmq_stomp()
        return RABBIT
    server: ActiveMQServer = request.getfixturevalue("activemq")
    return f"stomp://127.0.0.1:{server.port}/?dialect=activemq"


def _raw_read(url: str, queue: str, want: int, timeout: float = 30) -> list[str]:
    """The kew-id of every message a raw stomp.py client reads off
    ``queue`` (auto ack) until ``want`` came or ``timeout`` passed."""
    o = kew.connect(url)
    try:
        opts: Any = o.options  # type: ignore[attr-defined]
        host = opts.hosts[0]
        dest = o.dest(queue)  # type: ignore[attr-defined]
    finally:
        o.close()
    got: list[str] = []
    done = threading.Event()

    class L(stomp.ConnectionListener):  # type: ignore[misc]
        def on_message(self, frame: Any) -> None:
            got.append(frame.headers.get("kew-id", ""))
            if len(got) >= want:
                done.set()

    c = stomp.Connection12([host], vhost=opts.host_header(host[0]))
    c.set_listener("l", L())
    c.connect(opts.login, opts.passcode, wait=True)
    c.subscribe(dest, id="raw", ack="auto")
    done.wait(timeout)
    c.disconnect()
    return got


def test_concurrent_sends_are_receipts_in_flight_on_one_connection(stomp_url: str) -> None:
    """1,000 concurrent ``await send``: one connection, many sends awaiting
    their receipt at once (each its own on RabbitMQ; on ActiveMQ, batch=tx,
    the sends of a turn of the writer share a COMMIT's), every await
    returning with its message on the broker (a raw client reads all
    1,000, once each)."""
    name = f"aio-inflight-{os.urandom(3).hex()}"

    async def main() -> tuple[int, int]:
        conn = kew.aio.connect(stomp_url)
        assert kew.aio.route(conn) == "native"
        assert isinstance(conn, StompAsyncConnector)
        p = await conn.producer(name)
        await p.send(Message("warm-up", b"w", {}))
        link = conn.pipe._link
        assert link is not None
        most = 0
        sending = True

        def sample() -> None:
            nonlocal most
            waiting = {id(e): e for e in list(link.pending.values())}.values()
            held = len(conn.pipe._held)  # ActiveMQ: for the next transaction
            most = max(most, held + sum(len(e.members) or 1 for e in waiting))

        async def ticker() -> None:  # samples between the loop's other steps
            while sending:
                sample()
                await asyncio.sleep(0)

        async def one(i: int) -> None:
            await p.send(Message(f"m{i}", b"x" * 64, {}))
            sample()

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(one(i) for i in range(1000)))
        sending = False
        await tick
        same = conn.pipe._link is link
        await conn.close()
        return most, int(same)

    most, same = asyncio.run(main())
    assert same, "the sends reconnected"
    assert most > 10, f"at most {most} sends awaited their receipts at once"
    got = _raw_read(stomp_url, name, 1001)
    assert sorted(got) == sorted(["warm-up", *(f"m{i}" for i in range(1000))])


def test_a_broker_that_does_not_answer_never_blocks_the_loop() -> None:
    """A server that accepts and says nothing: the send waits on the loop
    (a 10 ms ticker keeps ticking) and fails with BrokerUnavailable."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    url = f"stomp://127.0.0.1:{port}/?dialect=activemq&retries=0&connect_timeout=1"

    async def main() -> float:
        conn = kew.aio.connect(url)
        lag = 0.0
        stop = False

        async def tick() -> None:
            nonlocal lag
            while not stop:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - t - 0.01)

        ticker = asyncio.create_task(tick())
        p = await conn.producer("nobody")
        with pytest.raises(BrokerUnavailable):
            await p.send(Message("a", b"a", {}))
        stop = True
        await ticker
        await conn.close()
        return lag

    try:
        lag = asyncio.run(main())
    finally:
        server.close()
    assert lag < 0.5, f"the loop stood still for {lag:.3f} s"


def test_connections_cut_lose_nothing_awaited(activemq: ActiveMQServer) -> None:
    """Async producers and an async sink on ActiveMQ, every client
    connection cut twice mid-run: every message whose send returned is
    consumed (sends that raised are sent again by the test)."""
    url = f"stomp://127.0.0.1:{activemq.port}/?dialect=activemq&retries=30"
    name = f"aio-cut-{os.urandom(3).hex()}"
    got: set[int] = set()
    sent: list[int] = []

    async def main() -> None:
        conn = kew.aio.connect(url)
        q = kew.aio.Queue(conn, name, int)
        stop = asyncio.Event()

        async def produce(start: int) -> None:
            i = start
            while not stop.is_set() and i < start + 1500:
                batch = list(range(i, i + 10))
                try:
                    await asyncio.gather(*(q.send(n) for n in batch))
                except kew.KewError:
                    continue  # not receipted: send again
                sent.extend(batch)
                i += 10

        async def handle(n: int) -> None:
            got.add(n)

        async def until(cond: Any, what: str, timeout: float = 60) -> None:
            async with asyncio.timeout(timeout):
                while not cond():
                    await asyncio.sleep(0.05)

        try:
            async with q.sink(handle, concurrency=4):
                producers = [asyncio.create_task(produce(k * 10_000)) for k in range(3)]
                await until(lambda: len(got) >= 200, "consumption before the cut")
                assert isinstance(conn, StompAsyncConnector)
                first = conn.pipe._link
                for _ in range(2):
                    n = len(sent)
                    await asyncio.to_thread(activemq.cut_connections)
                    await until(lambda n=n: len(sent) >= n + 200, "sends after the cut")
                stop.set()
                await asyncio.gather(*producers)
                assert conn.pipe._link is not first, "the cut did not reach the sending connection"
                await until(lambda: set(sent) <= got, "every awaited message", 90)
        finally:
            stop.set()
            await conn.delete(name)
            await conn.close()

    asyncio.run(main())
    assert sent and not set(sent) - got


def test_acked_is_not_delivered_again_after_close(stomp_url: str) -> None:
    """An ACK is written, not awaited (as the sync route), and ``close``
    ends the connection after every ACK queued (DISCONNECT with a receipt):
    an acked message is not delivered again to a new consumer, and a dead
    letter's copy is on ``<q>.dead`` with its reason once ``dead_letter``
    returned."""
    name = f"aio-ack-{os.urandom(3).hex()}"

    async def main() -> None:
        conn = kew.aio.connect(stomp_url)
        try:
            p = await conn.producer(name)
            await p.send_many([Message("a", b"1", {}), Message("b", b"2", {})])
            c = await conn.consumer(name, 2)
            held: list[Any] = []
            async with asyncio.timeout(20):
                while len(held) < 2:
                    held += await c.fetch(2, 5)
            by_id = {d.message.id: d for d in held}
            await c.ack(by_id["a"])
            await c.ack(by_id["a"])  # settled twice: nothing
            await c.dead_letter(by_id["b"], "no thanks")
            await c.close()
            browser = await conn.browser(name)
            dead = await browser.dead_letters(10)
            assert [(d.message.id, d.reason) for d in dead] == [("b", "no thanks")]
            c2 = await conn.consumer(name, 2)
            assert list(await c2.fetch(2, 1.0)) == []
            await c2.close()
        finally:
            await conn.delete(name)
            await conn.close()

    asyncio.run(main())


def test_consumer_wakes_without_polling(stomp_url: str) -> None:
    """A fetch waiting 30 s returns as soon as a send lands, and a burst of
    200 deliveries is all fetched and acked, once each."""
    name = f"aio-wake-{os.urandom(3).hex()}"

    async def main() -> None:
        conn = kew.aio.connect(stomp_url)
        try:
            c = await conn.consumer(name, 200)
            p = await conn.producer(name)
            fetch = asyncio.create_task(c.fetch(10, 30))
            await asyncio.sleep(0)
            t = time.monotonic()
            await p.send(Message("x", b"x", {}))
            got = await fetch
            assert [d.message.id for d in got] == ["x"]
            assert time.monotonic() - t < 5
            for d in got:
                await c.ack(d)
            await p.send_many([Message(f"b{i}", b"b", {}) for i in range(200)])
            taken: list[Any] = []
            async with asyncio.timeout(30):
                while len(taken) < 200:
                    taken += await c.fetch(200, 5)
            await asyncio.gather(*(c.ack(d) for d in taken))
            assert sorted(d.message.id for d in taken) == sorted(f"b{i}" for i in range(200))
            await c.close()
        finally:
            await conn.delete(name)
            await conn.close()

    asyncio.run(main())


def test_an_async_connector_works_in_a_forked_child_and_still_in_the_parent() -> None:
    """The sending connection and its writer thread are the parent's: a
    child made by os.fork sends on a connection and a thread of its own
    (the parent's connection is never written on: the parent's next send
    still goes on it)."""
    require_rabbitmq_stomp()
    name = f"aio-fork-{os.urandom(3).hex()}"
    conn = kew.aio.connect(RABBIT)
    assert isinstance(conn, StompAsyncConnector)

    async def send(v: str) -> None:
        await conn.pipe.submit(conn.ops([(name, Message(v, v.encode(), {}))]), label=name)

    asyncio.run(send("parent-1"))
    link = conn.pipe._link
    pid = os.fork()
    if pid == 0:  # the child: its own loop, thread and connection
        code = 1
        try:
            asyncio.run(send("child"))
            code = 0 if conn.pipe._link is not link else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    asyncio.run(send("parent-2"))
    assert conn.pipe._link is link and link is not None and link.usable()
    try:
        assert sorted(_raw_read(RABBIT, name, 3)) == ["child", "parent-1", "parent-2"]
    finally:

        async def done() -> None:
            await conn.delete(name)
            await conn.close()

        asyncio.run(done())
