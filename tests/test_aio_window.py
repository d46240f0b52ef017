"""kew.aio's adaptive window and grouped acks (the asyncio runtime, as
tests/test_window.py for the sync one): on memory, SQLite, Redis and
RabbitMQ the async sink's window grows above the concurrency under a
steady stream of no-op messages and comes back to it when the handlers
turn slow; ``prefetch`` pins it; acks go in groups, each after its own
handler returned, and an ack that fails hands its delivery back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import kew
import kew.aio
from kew.aio._runtime import AsyncWindowedConsumer, Subscription
from kew.qchan._window import cap
from kew.qchan.spi import Delivery, Message
from kew.qchan.spi.aio import AsyncConnector, AsyncConsumer
from kew.testing.aio_conformance import eventually
from kew.testing.util import port_open, require


def _run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(120):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(params=["memory", "sqlite", "redis", "rabbitmq", "bridge"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://aio-window-{os.urandom(3).hex()}"
    if request.param in ("sqlite", "bridge"):
        return f"sqlite:///{tmp_path}/w.sqlite3"
    if request.param == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        return "redis://127.0.0.1:6379/0"
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def connect(request: pytest.FixtureRequest, url: str) -> Callable[[], AsyncConnector]:
    """The async connector: native, or the thread bridge (``bridge``)."""
    if "bridge" in request.node.callspec.id:
        return lambda: kew.aio.BridgeConnector(kew.connect(url))  # type: ignore[attr-defined]
    return lambda: kew.aio.connect(url)


def test_every_native_route_and_the_bridge_can_change_the_window(
    connect: Callable[[], AsyncConnector],
) -> None:
    async def main() -> None:
        conn = connect()
        name = f"aw.probe-{os.urandom(4).hex()}"
        await conn.declare(name)
        consumer = await conn.consumer(name, 1)
        try:
            assert isinstance(consumer, AsyncWindowedConsumer), type(consumer)
            await consumer.set_prefetch(16)
        finally:
            await consumer.close()
            await conn.delete(name)
            await conn.close()

    _run(main())


def test_window_grows_for_no_ops_and_comes_back_for_slow_handlers(
    connect: Callable[[], AsyncConnector],
) -> None:
    async def main() -> None:
        conn = connect()
        q = kew.aio.Queue(conn, f"aw.{os.urandom(4).hex()}", int)
        slow = asyncio.Event()
        stop = asyncio.Event()

        async def handle(_: int) -> None:
            if slow.is_set():
                await asyncio.sleep(0.03)  # the handler's work (slow: over _window.SLOW)

        async def produce() -> None:  # a steady stream
            while not stop.is_set():
                await q.send_many(range(50))
                await asyncio.sleep(0.005)

        producer = asyncio.create_task(produce())
        sub = await q.sink(handle, concurrency=2)
        try:
            assert sub.adaptive and sub.window == 2
            await eventually(lambda: sub.window > 2, 15, "a window above the concurrency")
            assert sub.window <= cap(2)
            slow.set()
            await eventually(lambda: sub.window == 2, 15, "the window back to the concurrency")
            # What was fetched while it was wide runs here (not handed back);
            # once that is done, 2 at most are held.
            await eventually(lambda: sub.in_flight <= 2, 60, "the deliveries fetched drained")
            for _ in range(20):
                assert sub.in_flight <= 2 and sub.window == 2
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await producer
            await sub.stop(5)
            await conn.delete(q.name)
            await q.close()
            await conn.close()

    _run(main())


def test_prefetch_pins_the_window(connect: Callable[[], AsyncConnector]) -> None:
    async def main() -> None:
        conn = connect()
        q = kew.aio.Queue(conn, f"aw.pin-{os.urandom(4).hex()}", int)
        await q.send_many(range(300))
        count = [0]

        async def handle(_: int) -> None:
            count[0] += 1

        try:
            async with q.sink(handle, prefetch=3) as sub:
                await eventually(lambda: count[0] == 300, 60, "300 handled")
                assert not sub.adaptive and sub.window == sub.prefetch == 3
        finally:
            await conn.delete(q.name)
            await q.close()
            await conn.close()

    _run(main())


# -- grouped acks, on memory (a consumer that notes every ack) -----------------------


class _Counting:
    """A real async consumer that notes each ack, and when it came (no
    set_prefetch: its window cannot change)."""

    def __init__(self, consumer: AsyncConsumer, returned: list[str]) -> None:
        self.consumer = consumer
        self.returned = returned
        self.acked: list[str] = []
        self.early: list[str] = []  # acked before its handler returned
        self.tasks: set[str] = set()  # the tasks that acked
        self.gate: asyncio.Event | None = None  # acks wait for it, when set
        self.fail: set[str] = set()  # ids whose ack raises
        self.released: list[str] = []
        self.waits = False  # each ack waits on the loop (as a round trip would)
        self.now = self.peak = 0  # acks under way, and the most at once

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        return await self.consumer.fetch(max_count, timeout)

    async def ack(self, delivery: Delivery) -> None:
        i = delivery.message.id
        if i not in self.returned:
            self.early.append(i)
        task = asyncio.current_task()
        self.tasks.add(task.get_name() if task is not None else "")
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.waits:
                await asyncio.sleep(0.001)
        finally:
            self.now -= 1
        if i in self.fail:
            self.fail.discard(i)  # (once: delivered again, it is acked)
            raise ConnectionError(f"the ack of {i} was lost")
        await self.consumer.ack(delivery)
        self.acked.append(i)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.consumer.dead_letter(delivery, reason)

    async def release(self, delivery: Delivery) -> None:
        self.released.append(delivery.message.id)
        await self.consumer.release(delivery)

    async def close(self) -> None:
        await self.consumer.close()


async def _subscribe(
    n: int,
    *,
    concurrency: int = 1,
    prefetch: int = 16,
    fail: Sequence[str] = (),
    waits: bool = False,
    gate: asyncio.Event | None = None,
) -> tuple[AsyncConnector, str, _Counting, list[str], Subscription]:
    conn = kew.aio.connect(f"memory://aio-acks-{os.urandom(3).hex()}")
    name = f"aw.acks-{os.urandom(4).hex()}"
    await conn.declare(name)
    await (await conn.producer(name)).send_many([Message(f"m{i}", b"x") for i in range(n)])
    returned: list[str] = []
    counting = _Counting(await conn.consumer(name, prefetch), returned)
    counting.fail, counting.waits, counting.gate = set(fail), waits, gate

    async def handle(_: AsyncConsumer, d: Delivery) -> bool:
        returned.append(d.message.id)
        return True  # acked by the subscription

    async def open_consumer(_: int) -> AsyncConsumer:
        return counting

    sub = Subscription(open_consumer, handle, name=name, concurrency=concurrency, prefetch=prefetch)
    await sub
    return conn, name, counting, returned, sub


@pytest.mark.parametrize("waits", [False, True], ids=["inline", "waiting"])
def test_acks_go_in_groups_each_after_its_handler(waits: bool) -> None:
    """One worker with a window of 16: its acks are made by the ack task,
    in groups, none before its handler returned; acks that wait on the
    loop (a round trip) are awaited together, the others one by one."""

    async def main() -> None:
        n = 2000
        conn, name, counting, _, sub = await _subscribe(n, waits=waits)
        try:
            await eventually(lambda: len(counting.acked) == n, 30, f"{n} acks")
        finally:
            await sub.stop(5)
        assert sorted(counting.acked) == sorted(f"m{i}" for i in range(n))  # each once
        assert counting.early == []
        assert f"kew-work-{name}-0" not in counting.tasks  # none by the worker
        assert sub.commits < n // 2 and sub.acked == n  # in groups
        assert counting.peak > 1 if waits else counting.peak == 1
        assert (await (await conn.browser(name)).stats()).in_flight == 0
        await conn.close()

    _run(main())


def test_no_slack_no_group() -> None:
    """A window of the concurrency: each ack awaited by its worker, before
    its slot is free (a group would only add a hop)."""

    async def main() -> None:
        conn, name, counting, _, sub = await _subscribe(20, prefetch=1)
        try:
            await eventually(lambda: len(counting.acked) == 20, 10, "20 acks")
            assert sub.window == 1 and sub.commits == 0
        finally:
            await sub.stop(5)
        assert counting.tasks == {f"kew-work-{name}-0"} and counting.early == []
        await conn.close()

    _run(main())


def test_acks_handed_over_are_committed_at_stop() -> None:
    async def main() -> None:
        gate = asyncio.Event()  # every ack waits: they pile up, handed over
        conn, name, counting, returned, sub = await _subscribe(
            50, concurrency=2, prefetch=50, gate=gate
        )
        await eventually(lambda: len(returned) == 50, 10, "50 handled")
        assert sub.in_flight == 50  # handled, acks not done: still held
        asyncio.get_running_loop().call_later(0.3, gate.set)
        assert await sub.stop(grace=10) is True  # waited for the acks
        assert sorted(counting.acked) == sorted(returned)
        assert (await (await conn.browser(name)).stats()).in_flight == 0
        await conn.close()

    _run(main())


def test_an_ack_that_fails_hands_its_delivery_back() -> None:
    async def main() -> None:
        conn, name, counting, returned, sub = await _subscribe(40, fail=["m7", "m23"])
        try:
            # handed back, delivered again, acked the second time
            await eventually(lambda: len(counting.acked) == 40, 10, "40 acks")
            assert sorted(counting.released) == ["m23", "m7"]
            assert sorted(i for i in returned if returned.count(i) == 2) == ["m23"] * 2 + ["m7"] * 2
            await eventually(lambda: sub.in_flight == 0, 10, "nothing held")
        finally:
            await sub.stop(5)
        stats = await (await conn.browser(name)).stats()
        assert stats.ready == 0 and stats.in_flight == 0 and stats.dead == 0
        await conn.close()

    _run(main())
