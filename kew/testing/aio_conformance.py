"""The conformance kit through the async front door (:mod:`kew.aio`).

The semantics of :mod:`kew.testing.conformance`, checked on a real broker
through ``kew.aio`` (the provider's native async route, or the thread
bridge), and the two APIs checked against each other: what one sends the
other consumes, with the same headers and the same dead-letter reasons::

    from kew.testing.aio_conformance import AsyncProviderConformance

    class TestMyBrokerAsync(AsyncProviderConformance):
        expected_route = "native"     # or "bridge" while it has no aio()

        @pytest.fixture
        def url(self) -> str:
            return "mybroker://127.0.0.1:1234/?lease=2"

The tests are plain (sync) test functions that run their coroutine with
``asyncio.run``: no pytest plugin is needed.  Run as a module
(``python -m kew.testing.aio_conformance URL QUEUE``) it takes one message
through ``kew.aio`` and holds it (the crash-redelivery test kills it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, overload

import pytest

import kew
import kew.aio
from kew.core.msg import FutureTimepoint
from kew.qchan.codec import type_name
from kew.qchan.spi import Capability, Message, now_ms
from kew.qchan.spi.aio import AsyncConnector
from kew.testing.conformance import Event, Job, Point, Request, _divide_by_zero
from kew.testing.util import wait_for

R = TypeVar("R")

# -- types the kit round-trips: the sync kit's own ------------------------------

#: (type, values) round-tripped by every provider, edge cases included.
ROUND_TRIPS: list[tuple[Any, list[Any]]] = [
    (
        Job,
        [
            Job(1, "one", ["a", "b"], [Point(1, 2.5, "p")], {"k": 3}),
            Job(-(2**53), "", [], [], None),
            Job(2**53, "ünïcødé \u2603 \x00", ["\n"], [Point(0, -0.0), Point(-1, 1e300)]),
        ],
    ),
    (Request, [Request("a@b.c", 25, None), Request("", -1, 2**40)]),
    (Event, [{"kind": "k", "at": 0}, {"kind": "", "at": -5}]),
    (int, [0, -1, 2**53]),
    (str, ["", "text", "\u2603" * 100]),
    (list[float], [[], [0.5, -1e-300]]),
    (dict[str, list[int]], [{}, {"a": [1, 2], "": []}]),
    (tuple[int, str, bool], [(1, "x", True), (0, "", False)]),
]


@overload
async def eventually(
    condition: Callable[[], Awaitable[R]], timeout: float = ..., what: str = ...
) -> R: ...


@overload
async def eventually(condition: Callable[[], R], timeout: float = ..., what: str = ...) -> R: ...


async def eventually(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` (a function, or a coroutine function) on the event
    loop until it returns something truthy; return that.  Raises
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition!r}")
        await asyncio.sleep(0.02)


async def collect(q: kew.aio.Queue[Any], n: int, timeout: float = 20.0, **kw: Any) -> list[Any]:
    """Consume ``n`` values with an async sink (acked), in arrival order."""
    got: list[Any] = []

    async def add(value: Any) -> None:
        got.append(value)

    async with q.sink(add, **kw):
        await eventually(lambda: len(got) >= n, timeout, f"{n} messages on {q.name}")
    return got


def collect_sync(q: kew.Queue[Any], n: int, timeout: float = 20.0) -> list[Any]:
    """Consume ``n`` values with the sync API's sink."""
    got: list[Any] = []
    with q.sink(got.append):
        wait_for(lambda: len(got) >= n, timeout, what=f"{n} messages on {q.name} (sync)")
    return got


class AsyncProviderConformance:
    """Subclass this with a ``url`` fixture to check a provider through kew.aio."""

    #: The route ``kew.aio.connect`` must take: "native" or "bridge".
    expected_route: str = "bridge"
    #: Seconds the kit waits for a killed consumer's message to come back.
    crash_redelivery_timeout: float = 60.0
    #: How late a delayed message may be on an idle broker, in seconds.
    max_delay_lateness: float = 1.0
    #: Seconds a test's coroutine may run.
    test_timeout: float = 90.0
    #: Whether ``stats().ready`` counts a message a handler holds (not yet
    #: acked): ActiveMQ's browse (a ``browser:true`` subscription) lists it.
    browse_lists_held: bool = False

    # -- fixtures and helpers ------------------------------------------------

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("a conformance test class must define a `url` fixture")

    @pytest.fixture
    def queue_name(self, url: str, request: pytest.FixtureRequest) -> Iterator[str]:
        name = f"aio-{request.node.name[:40].strip('_')}-{os.urandom(4).hex()}"
        name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
        yield name
        c = kew.connect(url)
        try:
            c.delete(name)
        finally:
            c.close()

    def lacks(self, url: str, capability: Capability) -> str | None:
        """Why the provider lacks ``capability``; None when it has it."""
        c = kew.connect(url)
        try:
            reason = c.lacks.get(capability)
        finally:
            c.close()
        return None if reason is None else f"{c.url} lacks {capability.value}: {reason}"

    def need(self, url: str, capability: Capability) -> None:
        """Skip, with the provider's reason, when it lacks ``capability``."""
        reason = self.lacks(url, capability)
        if reason is not None:
            pytest.skip(reason)

    def run(self, url: str, body: Callable[[AsyncConnector], Awaitable[None]]) -> None:
        """Run ``body`` with a fresh ``kew.aio`` connector on a new event loop."""

        async def main() -> None:
            conn = kew.aio.connect(url)
            try:
                async with asyncio.timeout(self.test_timeout):
                    await body(conn)
            finally:
                await conn.close()

        asyncio.run(main())

    # -- the route -----------------------------------------------------------

    def test_route(self, url: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            assert kew.aio.route(conn) == self.expected_route, conn
            assert isinstance(conn, kew.aio.AsyncConnector)
            assert "://" in conn.url and conn.max_message_size > 0

        self.run(url, body)

    # -- typed round trips, order, batches -------------------------------------

    @pytest.mark.parametrize("codec", ["json", "msgpack"])
    def test_typed_round_trip(self, url: str, queue_name: str, codec: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            for i, (tp, values) in enumerate(ROUND_TRIPS):
                q: kew.aio.Queue[Any] = kew.aio.Queue(conn, f"{queue_name}-{i}", tp, codec=codec)
                try:
                    await q.send_many(values[:1])
                    for value in values[1:]:
                        await q.send(value)
                    assert await collect(q, len(values)) == values, tp
                finally:
                    await q.close()
                    await conn.delete(q.name)

        self.run(url, body)

    def test_fifo_send_and_send_many(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)
            for i in range(30):
                await q.send(i)
            await q.send_many(range(30, 60))
            assert await collect(q, 60) == list(range(60))

        self.run(url, body)

    def test_send_checks_the_type_and_sends_nothing_bad(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, Point)
            with pytest.raises(kew.InvalidValue, match=r"Expected `int`, got `str` - at `\$.x`"):
                await q.send(Point("1", 2.0))  # type: ignore[arg-type]
            with pytest.raises(kew.InvalidValue, match=repr(queue_name)):
                await q.send_many([Point(1, 2.0), "not a point"])  # type: ignore[list-item]
            limit = conn.max_message_size
            with pytest.raises(kew.MessageTooLarge):
                await q.send(Point(1, 2.0, "x" * limit))
            assert (await q.browser().stats()).ready in (0, -1)
            await q.send(Point(3, 4.0))
            assert await collect(q, 1) == [Point(3, 4.0)]

        self.run(url, body)

    # -- delays ------------------------------------------------------------

    def test_delayed_send_never_early(self, url: str, queue_name: str) -> None:
        self.need(url, Capability.DELAYED_DELIVERY)

        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)
            received: dict[int, int] = {}

            async def note(i: int) -> None:
                received.setdefault(i, now_ms())

            async with q.sink(note, concurrency=2):
                at = FutureTimepoint.after(1.5)
                await q.send_at(at, 0)
                due = {0: at.epoch_ms, 1: now_ms() + 500}
                await q.send_after(0.5, 1)
                due[2] = now_ms() + 1000
                await q.post(2, deliver_at=due[2])
                await q.send(99)
                await eventually(lambda: len(received) == 4, 15, "4 messages")
            for i in range(3):
                assert received[i] >= due[i], f"message {i} came {due[i] - received[i]} ms early"
                late = (received[i] - due[i]) / 1000
                assert late <= self.max_delay_lateness + 0.1, f"message {i} came {late:.3f}s late"
            assert received[99] <= min(received[i] for i in range(3))

        self.run(url, body)

    # -- acks, handlers, dead letters -------------------------------------------

    def test_ack_only_after_the_handler_returns(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, str)
            await q.send("slow")
            entered, finish = asyncio.Event(), asyncio.Event()

            async def blocked(_: str) -> None:
                entered.set()
                await finish.wait()

            sub = await q.sink(blocked)
            async with asyncio.timeout(10):
                await entered.wait()
            stats = await q.browser().stats()
            if self.browse_lists_held:
                assert stats.ready in (1, -1), stats
            else:
                assert stats.in_flight in (1, -1) and stats.ready in (0, -1), stats
            # The handler has not returned: stopping cancels it and hands the message back.
            assert await sub.stop(grace=0.2) is False
            assert not sub.alive
            assert await collect(q, 1) == ["slow"]

            returned: list[str] = []

            async def quick(s: str) -> None:
                returned.append(s)

            await q.send("quick")
            async with q.sink(quick):
                await eventually(lambda: returned, 10, "the quick message")

                async def settled() -> bool:
                    s = await q.browser().stats()
                    if self.browse_lists_held:  # (then it counts: acked, it is gone)
                        return s.ready == 0
                    return s.in_flight in (0, -1) and s.ready in (0, -1)

                await eventually(settled, 10, "the ack")
            async with q.deliveries() as stream:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await anext(stream)  # acked: not delivered again

        self.run(url, body)

    def test_raising_handler_dead_letters_with_the_reason(
        self, url: str, queue_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, str)
            calls: list[str] = []

            async def fail(s: str) -> None:
                calls.append(s)
                if s == "x":
                    raise ValueError(f"cannot handle {s}")

            await q.send("x")
            with caplog.at_level(logging.INFO, logger="kew"):
                async with q.sink(fail):
                    dead = await eventually(q.dead.list, 10, "a dead letter")
                    await q.send("y")
                    await eventually(lambda: len(calls) >= 2, 10, "the next message")
            assert calls == ["x", "y"]
            assert dead[0].reason.startswith("ValueError: cannot handle x\n")
            assert "Traceback" in dead[0].reason and "in fail" in dead[0].reason
            assert dead[0].body == b'"x"' and dead[0].dead_at > 0
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert errors[0].getMessage() == (
                f"kew: {queue_name}: handler failed on message {dead[0].id} (delivery 1); "
                "it goes to the dead letters: ValueError: cannot handle x"
            )

        self.run(url, body)

    def test_body_that_does_not_decode_dead_letters(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, Point)
            raw = await q.producer()
            await raw.send(Message("bad-1", b'{"x": "not a number", "y": 1.0}'))
            await raw.send(Message("bad-2", b"\xff\x00 not json", {"content-type": "text/x"}))
            await q.send(Point(1, 2.0))
            assert await collect(q, 1) == [Point(1, 2.0)]
            dead = await eventually(lambda: _dead_by_id(q, 2), 10, "2 dead letters")
            point = type_name(Point)
            assert (
                dead["bad-1"] == f"cannot decode as {point}: Expected `int`, got `str` - at `$.x`"
            )
            assert dead["bad-2"].startswith(f"cannot decode as {point}: ")
            assert "(sent as 'text/x'; queue" in dead["bad-2"]

        self.run(url, body)

    def test_dead_letters_list_requeue_purge(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)

            async def divide(i: int) -> None:
                1 / 0  # noqa: B018

            async with q.sink(divide):
                await q.send_many(range(4))
                await eventually(lambda: _dead_by_id(q, 4), 10, "4 dead letters")
            dead = await q.dead.list()
            assert all(d.reason.startswith("ZeroDivisionError: division by zero") for d in dead)
            assert (await q.browser().stats()).dead in (4, -1)
            assert await q.dead.requeue([dead[0].id]) == 1
            assert await collect(q, 1) == [0]
            assert len(await q.dead.list()) == 3
            assert await q.dead.purge([dead[1].id]) == 1
            assert sorted(int(d.body) for d in await q.dead.list()) == [2, 3]
            assert await q.dead.requeue() == 2
            assert sorted(await collect(q, 2)) == [2, 3]
            async with q.sink(divide):
                await q.send(7)
                await eventually(q.dead.list, 10, "a dead letter")
            assert await q.dead.purge() == 1
            assert await q.dead.list() == []

        self.run(url, body)

    def test_stats_and_peek(self, url: str, queue_name: str) -> None:
        browse = self.lacks(url, Capability.BROWSE) is None

        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)
            await q.send_many(range(5))

            async def five_ready() -> bool:
                return (await q.browser().stats()).ready == 5

            await eventually(five_ready, 10, "ready=5")
            stats = await q.browser().stats()
            assert stats.in_flight in (0, -1) and stats.dead in (0, -1), stats
            if browse:
                assert await q.browser().peek(3) == [0, 1, 2]
            assert await q.browser().purge() in (5, -1)
            await eventually(lambda: _ready_is(q, 0), 10, "ready=0 after the purge")

        self.run(url, body)

    # -- concurrency, stop, liveness --------------------------------------------

    def test_concurrency_runs_n_coroutines(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)
            await q.send_many(range(12))
            now, peak, done = [0], [0], []
            two_at_once = asyncio.Event()

            async def work(i: int) -> None:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
                if now[0] >= 2:
                    two_at_once.set()
                try:  # hold on until another handler runs beside this one
                    async with asyncio.timeout(2):
                        await two_at_once.wait()
                except TimeoutError:
                    pass
                now[0] -= 1
                done.append(i)

            async with q.sink(work, concurrency=4) as sub:
                assert sub.prefetch == 4
                await eventually(lambda: len(done) == 12, 30, "12 messages")
            assert 2 <= peak[0] <= 4, peak[0]

        self.run(url, body)

    def test_stop_hands_back_what_has_not_started(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, int)
            await q.send_many(range(4))
            started: list[int] = []

            async def stuck(i: int) -> None:
                started.append(i)
                await asyncio.Event().wait()  # never returns

            sub = await q.sink(stuck, concurrency=1, prefetch=4)
            await eventually(lambda: started and sub.in_flight == 4, 15, "4 held, 1 started")
            assert sub.alive and await sub.healthy()
            t0 = time.monotonic()
            assert await sub.stop(grace=0.1) is False
            assert time.monotonic() - t0 < 5
            assert not sub.alive and sub.in_flight == 0
            assert await sub.stop() is False  # once stopped, stop says the same
            assert sorted(await collect(q, 4, concurrency=4)) == [0, 1, 2, 3]

        self.run(url, body)

    def test_crash_redelivery(self, url: str, queue_name: str) -> None:
        """A process consuming through kew.aio, killed with SIGKILL while it
        holds a delivery: the message comes back, counted again."""
        self.need(url, Capability.MULTIPROCESS)

        async def send(conn: AsyncConnector) -> None:
            await kew.aio.Queue(conn, queue_name, str).send("precious")

        self.run(url, send)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kew.testing.aio_conformance", url, queue_name],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("HOLDING"), f"the holding process said {line!r}"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

        async def receive(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, str)
            async with q.deliveries() as stream:
                async with asyncio.timeout(self.crash_redelivery_timeout):
                    d = await anext(stream)
                await d.ack()
            assert d.value == "precious" and d.delivery_count >= 2

        self.run(url, receive)

    # -- async for ------------------------------------------------------------

    def test_async_for_with_explicit_ack_and_dead_letter(self, url: str, queue_name: str) -> None:
        async def body(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, str)
            raw = await q.producer()
            await q.send_many(["ack me", "dead me"])
            await raw.send(Message("undecodable", b"\xff not json"))
            await q.send("leave me")
            seen: list[str] = []
            async with q.deliveries(prefetch=2) as stream:
                async for d in stream:
                    seen.append(d.value)
                    assert d.delivery_count == 1 and d.headers["kew-type"] == "str"
                    if d.value == "ack me":
                        await d.ack()
                        await d.ack()  # settling twice is a no-op
                        await d.dead_letter("settled already")
                    elif d.value == "dead me":
                        await d.dead_letter("not wanted here")
                    else:
                        break  # left unsettled: handed back when the stream closes
            assert seen == ["ack me", "dead me", "leave me"]
            dead = await eventually(lambda: _dead_by_id(q, 2), 10, "2 dead letters")
            by_reason = sorted(dead.values())
            assert by_reason[1] == "not wanted here"
            assert by_reason[0].startswith("cannot decode as str: ")
            async with q.deliveries() as stream:
                async with asyncio.timeout(10):
                    again = await anext(stream)
                assert again.value == "leave me"
                await again.ack()
            stats = await q.browser().stats()
            assert stats.ready in (0, -1) and stats.dead in (2, -1)

        self.run(url, body)

    # -- one API to the other ----------------------------------------------------

    def test_async_producer_sync_consumer(self, url: str, queue_name: str) -> None:
        async def send(conn: AsyncConnector) -> None:
            q = kew.aio.Queue(conn, queue_name, Point)

            async def fail(p: Point) -> None:
                raise RuntimeError(f"async handler refused {p.x}")

            await q.send(Point(5, 5.0))
            async with q.sink(fail):
                await eventually(q.dead.list, 10, "the async dead letter")
            await q.send(Point(1, 1.0))
            assert await q.post(Point(2, 2.0), id="async-2") == "async-2"
            await q.send_many([Point(3, 3.0), Point(4, 4.0)])

        self.run(url, send)
        c = kew.connect(url)
        try:
            q = kew.Queue(c, queue_name, Point)
            assert collect_sync(q, 4) == [Point(i, float(i)) for i in range(1, 5)]
            (dead,) = q.dead.list()
            assert dead.reason.startswith("RuntimeError: async handler refused 5\n")
            assert set(dead.headers) >= {"content-type", "kew-type", "kew-sent-at"}
            assert (dead.headers["content-type"], dead.headers["kew-type"]) == (
                "application/json",
                type_name(Point),
            )
            assert q.dead.requeue() == 1
            assert collect_sync(q, 1) == [Point(5, 5.0)]
        finally:
            c.close()

    def test_sync_producer_async_consumer(self, url: str, queue_name: str) -> None:
        c = kew.connect(url)
        try:
            q = kew.Queue(c, queue_name, Point)
            # what the sync API dead-letters, and why
            q.producer.send(Message("bad", b'{"x": "one", "y": 1.0}'))
            q.send(Point(9, 9.0))
            with q.sink(_divide_by_zero):
                wait_for(lambda: len(q.dead.list()) == 2, 10, what="the sync dead letters")
            sync_dead = {d.id: d.reason for d in q.dead.list()}
            assert q.dead.purge() == 2
            q.send(Point(1, 1.0))
            q.producer.send(Message("bad", b'{"x": "one", "y": 1.0}'))
            q.send_many([Point(2, 2.0), Point(3, 3.0)])
            assert q.post(Point(4, 4.0), id="sync-4") == "sync-4"
        finally:
            c.close()

        async def body(conn: AsyncConnector) -> None:
            aq = kew.aio.Queue(conn, queue_name, Point)
            assert await collect(aq, 4) == [Point(i, float(i)) for i in range(1, 5)]
            async_dead = await eventually(lambda: _dead_by_id(aq, 1), 10, "a dead letter")
            # the same body, dead-lettered by each API: the same reason
            (sync_reason,) = [r for r in sync_dead.values() if r.startswith("cannot decode")]
            assert async_dead["bad"] == sync_reason
            (zero,) = [r for r in sync_dead.values() if not r.startswith("cannot decode")]
            assert zero.startswith("ZeroDivisionError: division by zero\n")

        self.run(url, body)


async def _dead_by_id(q: kew.aio.Queue[Any], n: int) -> dict[str, str]:
    """The dead letters' reasons by message id, once there are ``n`` (else
    an empty dict)."""
    dead = await q.dead.list()
    return {d.id: d.reason for d in dead} if len(dead) == n else {}


async def _ready_is(q: kew.aio.Queue[Any], n: int) -> bool:
    return (await q.browser().stats()).ready in (n, -1)


async def _hold(url: str, queue: str) -> None:
    conn = kew.aio.connect(url)
    consumer = await conn.consumer(queue, 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = await consumer.fetch(1, 0.5)
        if got:
            print(f"HOLDING {got[0].message.id}", flush=True)
            await asyncio.sleep(3600)
    print("NOTHING", flush=True)


if __name__ == "__main__":
    asyncio.run(_hold(sys.argv[1], sys.argv[2]))
