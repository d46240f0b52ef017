"""Concurrent ``await q.send(...)`` calls (kew.aio._sends): a burst is sent
in bounded chunks, turn by turn, so the loop keeps running; a bad value fails
its own call only; a call cancelled before its turn sends nothing.  What was
stored is read back through the sync API on another connection."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kew
import kew.aio


class Thumb(msgspec.Struct):
    path: str
    size: int


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _stored(url: str, queue: str) -> list[Thumb]:
    """What the queue holds, read by the sync API on a connection of its own."""
    conn = kew.connect(url)
    try:
        return kew.Queue(conn, queue, Thumb).browser().peek(5000)
    finally:
        conn.close()


async def _burst(url: str) -> tuple[int, int]:
    """1,000 coroutines send at once while a ticker coroutine counts the
    loop's turns and how many sends ended between two of them."""
    conn = kew.aio.connect(url)
    q = kew.aio.Queue(conn, "burst", Thumb)
    await q.declare()
    done = [0]
    ticks: list[int] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(done[0])
            await asyncio.sleep(0)

    async def send(i: int) -> None:
        await q.send(Thumb(f"/img/{i}.png", 128))
        done[0] += 1

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(send(i) for i in range(1000)))
    stop.set()
    await tick
    assert (await q.browser().stats()).ready == 1000
    await conn.close()
    return len(ticks), max(b - a for a, b in itertools.pairwise(ticks))


def test_a_burst_of_a_thousand_sends_is_spread_over_turns_of_the_loop(tmp_path: Path) -> None:
    """The loop turns at least once per chunk of sends, and (memory: a send
    ends in its own turn) never ends more than a chunk or two at a time;
    before, the whole burst ran within one or two turns."""
    turns, most = _run(_burst("memory://aio-sends-burst"))
    assert turns >= 1000 // 64
    assert most <= 2 * 64
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    turns, _ = _run(_burst(url))  # (its writer may commit several chunks at once)
    assert turns >= 1000 // 64
    assert len(_stored(url, "burst")) == 1000


def test_a_bad_value_fails_its_own_call_and_the_rest_are_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}?max_message_size=2000"

    async def main() -> list[Any]:
        conn = kew.aio.connect(url)
        q = kew.aio.Queue(conn, "mixed", Thumb)
        calls: list[Any] = [q.send(Thumb(f"/img/{i}.png", i)) for i in range(20)]
        calls.insert(7, q.send({"path": 3}))  # type: ignore[arg-type]
        calls.insert(12, q.send(Thumb("/img/" + "x" * 5000, 1)))
        got = await asyncio.gather(*calls, return_exceptions=True)
        await conn.close()
        return got

    got = _run(main())
    errors = [g for g in got if isinstance(g, BaseException)]
    assert len(errors) == 2, got
    assert isinstance(got[7], kew.InvalidValue) and "'mixed'" in str(got[7])
    assert isinstance(got[12], kew.MessageTooLarge), got[12]
    assert sorted(t.size for t in _stored(url, "mixed")) == list(range(20))


def test_a_send_cancelled_before_its_turn_stores_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"

    async def main() -> None:
        conn = kew.aio.connect(url)
        q = kew.aio.Queue(conn, "cancelled", Thumb)
        await q.declare()
        task = asyncio.create_task(q.send(Thumb("/img/never.png", 1)))
        await asyncio.sleep(0)  # the send is waiting for its turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await q.send(Thumb("/img/after.png", 2))  # a turn later: sent alone
        await conn.close()

    _run(main())
    assert [t.path for t in _stored(url, "cancelled")] == ["/img/after.png"]


def test_concurrent_posts_return_their_own_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"

    async def main() -> list[str]:
        conn = kew.aio.connect(url)
        q = kew.aio.Queue(conn, "posts", Thumb)
        ids = await asyncio.gather(
            *(q.post(Thumb(f"/img/{i}.png", i), id=f"id-{i}") for i in range(150))
        )
        await conn.close()
        return list(ids)

    assert _run(main()) == [f"id-{i}" for i in range(150)]
    conn = kew.connect(url)
    try:
        stored = conn.browser("posts").peek(500)
    finally:
        conn.close()
    q = kew.Queue(kew.connect("memory://decode"), "posts", Thumb)
    assert {m.id: q.codec.decode(m.body).size for m in stored} == {f"id-{i}": i for i in range(150)}
