"""kew.aio beyond the kit: handlers refused at declaration, the memory
route's wake-up without threads, the bridge's cancelled fetch, a consumer
that fails for good, and misuse that must say what to do."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kew
import kew.aio
from kew.aio._bridge import BridgeConnector
from kew.qchan.spi import Connector, ConsumerFailed, Message
from kew.testing.aio_conformance import eventually


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- declaration errors --------------------------------------------------------


def render(t: int) -> None:
    """A plain function: refused by the async sink."""


class SyncRenderer:
    def __call__(self, t: int) -> None: ...


class AsyncRenderer:
    async def __call__(self, t: int) -> None: ...


async def arender(t: int) -> None: ...


async def arender2(t: int, size: int) -> None: ...


def test_a_plain_function_is_refused_naming_it() -> None:
    async def main() -> None:
        q = kew.aio.Queue(kew.aio.connect("memory://decl"), "thumbs", int)
        for handler, name in [
            (render, "render"),
            (SyncRenderer(), "SyncRenderer"),
            (lambda t: None, "<lambda>"),
            (print, "print"),
        ]:
            for declare in (q.sink, q.consume):
                with pytest.raises(TypeError, match=f"the sink handler .*{name}.* is not an async"):
                    declare(handler)  # type: ignore[arg-type]
        assert not kew.aio._runtime._RUNNING  # nothing was started
        for ok in (arender, AsyncRenderer(), functools.partial(arender2, size=2)):
            async with q.sink(ok) as sub:
                assert sub.alive

    _run(main())


def test_the_sync_api_still_refuses_async_handlers() -> None:
    q = kew.Queue(kew.connect("memory://decl-sync"), "thumbs", int)
    with pytest.raises(TypeError, match="arender is an async function"):
        q.sink(arender)


def test_sink_needs_a_running_loop_and_deliveries_need_async_with() -> None:
    q = kew.aio.Queue(kew.aio.connect("memory://misuse"), "m", int)
    with pytest.raises(RuntimeError, match="make it from a coroutine"):
        q.sink(arender)

    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"async with q\.deliveries"):
            async for _ in q.deliveries():
                pass
        with pytest.raises(ValueError, match="concurrency must be at least 1"):
            q.sink(arender, concurrency=0)
        with pytest.raises(ValueError, match="prefetch must be at least 1"):
            q.deliveries(prefetch=0)

    _run(main())


# -- the memory provider's native route ------------------------------------------


def test_memory_route_wakes_the_loop_without_threads() -> None:
    """A sync producer thread wakes an async fetch at once (a fetch that would
    otherwise wait 30 s), and the async side starts no thread of its own."""
    url = "memory://wake"

    async def main() -> None:
        conn = kew.aio.connect(url)
        assert kew.aio.route(conn) == "native"
        q = kew.aio.Queue(conn, "wake", str)
        await q.declare()
        before = set(threading.enumerate())
        sync_q = kew.Queue(kew.connect(url), "wake", str)
        sender = threading.Timer(0.2, sync_q.send, ("from a thread",))
        async with q.deliveries(poll_interval=30.0) as stream:
            sender.start()
            t0 = time.monotonic()
            async with asyncio.timeout(5):
                d = await anext(stream)
            assert d.value == "from a thread"
            assert time.monotonic() - t0 < 3
            await d.ack()
        sender.join()
        got: list[str] = []

        async def add(s: str) -> None:
            got.append(s)

        async with q.sink(add, concurrency=4):
            await q.send_many(["a", "b"])
            await eventually(lambda: len(got) == 2, 5, "2 messages")
            assert set(threading.enumerate()) <= before  # no thread per call, no fetch thread
        await conn.close()

    _run(main())


# -- the bridge -------------------------------------------------------------------


def test_bridge_cancelled_fetch_hands_back_what_it_takes(tmp_path: Path) -> None:
    """A fetch cancelled while its thread still waits: the message that
    thread takes afterwards is handed back at once, not held for the lease."""
    url = f"sqlite:///{tmp_path}/bridge.sqlite3?lease=600"

    async def main() -> None:
        conn = BridgeConnector(kew.connect(url))  # SQLite through the bridge (it has aio())
        assert kew.aio.route(conn) == "bridge"
        await conn.declare("b")
        first = await conn.consumer("b", 1)
        fetch = asyncio.create_task(first.fetch(1, 5.0))
        await asyncio.sleep(0.2)  # the fetch thread is waiting in the sync fetch
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        await (await conn.producer("b")).send(Message("m1", b"1"))
        second = await conn.consumer("b", 1)
        got = await eventually(lambda: second.fetch(1, 0.5), 10, "the handed back message")
        assert got[0].message.id == "m1"
        await second.ack(got[0])
        await second.close()
        await first.close()
        await conn.close()

    _run(main())


def test_a_consumer_that_fails_for_good_makes_the_subscription_not_alive(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gone.sqlite3"

    async def main() -> None:
        conn = kew.aio.connect(f"sqlite:///{db}")
        q = kew.aio.Queue(conn, "g", int)
        seen: list[int] = []

        async def add(i: int) -> None:
            seen.append(i)

        async with q.sink(add) as sub:
            await q.send(1)
            await eventually(lambda: seen, 10, "the first message")
            assert sub.alive and await sub.healthy()
            db.unlink()
            await eventually(lambda: not sub.alive, 10, "alive to turn False")
            assert isinstance(sub.error, ConsumerFailed)
            assert not await sub.healthy()
        await conn.close()

    _run(main())


class _WithoutAio:
    """A sync connector without a native route (delegates all but aio())."""

    def __init__(self, sync: Connector) -> None:
        self.sync = sync
        self.url, self.max_message_size, self.lacks = sync.url, sync.max_message_size, sync.lacks
        self.declare, self.producer, self.consumer = sync.declare, sync.producer, sync.consumer
        self.browser, self.delete, self.close = sync.browser, sync.delete, sync.close


def test_from_sync_takes_the_native_route_when_there_is_one(tmp_path: Path) -> None:
    memory = kew.aio.from_sync(kew.connect("memory://from-sync"))
    sqlite = kew.aio.from_sync(kew.connect(f"sqlite:///{tmp_path}/f.sqlite3"), threads=2)
    bare = kew.aio.from_sync(_WithoutAio(kew.connect(f"sqlite:///{tmp_path}/f.sqlite3")))
    routes = [kew.aio.route(c) for c in (memory, sqlite, bare)]
    assert routes == ["native", "native", "bridge"]
    with pytest.raises(ValueError, match="threads must be at least 1"):
        kew.aio.from_sync(_WithoutAio(kew.connect(f"sqlite:///{tmp_path}/f.sqlite3")), threads=0)
    for c in (memory, sqlite, bare):
        _run(c.close())


def test_closing_a_stream_ends_its_iteration() -> None:
    """``close()`` from another task ends an iteration waiting for room (all
    held, none settled) and hands the held delivery back."""

    async def main() -> None:
        conn = kew.aio.connect("memory://close-stream")
        q = kew.aio.Queue(conn, "c", int)
        await q.send_many([1, 2])
        seen: list[int] = []
        async with q.deliveries(prefetch=1) as stream:

            async def iterate() -> None:
                async for d in stream:
                    seen.append(d.value)  # never settled: the next waits for room

            task = asyncio.create_task(iterate())
            await eventually(lambda: seen == [1], 5, "the first delivery")
            await stream.close()
            async with asyncio.timeout(5):
                await task
        assert seen == [1]
        with pytest.raises(RuntimeError, match="closed"):
            async with stream:
                pass
        async with q.deliveries(prefetch=2) as again:
            got = [await anext(again), await anext(again)]
            assert sorted(d.value for d in got) == [1, 2]
        await conn.close()

    _run(main())
