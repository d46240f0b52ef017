"""The Redis provider's native async route (kew_redis/_aio.py,
_aio_consumer.py) on the machine's Redis: concurrent sends share round
trips and each returns once its own message is stored; an error reply
fails only the sends it belongs to; a cancelled fetch keeps nothing (what
its lost reply delivered is handed back at once); held deliveries keep
their leases; acks share round trips; errors are kew's.  The conformance
kit runs through this route in tests/test_aio_conformance.py (and on Redis
Cluster in tests/test_redis_cluster.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis

import kew
import kew.aio
from kew.qchan.spi import ConsumerFailed, Message, now_ms
from kew.testing.aio_conformance import eventually
from kew.testing.util import free_port, port_open, require
from kew_redis._aio import RedisAsyncConnector
from kew_redis._aio_consumer import RedisAsyncConsumer
from tests.test_redis_errors import PASSWORD, own_redis

__all__ = ["own_redis"]  # the fixture, for the error test

DB = 15
URL = f"redis://127.0.0.1:6379/{DB}?prefix=aiotest"


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
    r = redis.Redis(port=6379, db=DB)
    yield r
    for key in r.scan_iter("aiotest:*"):
        r.delete(key)
    r.close()


def _run(main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


def _native(url: str = URL) -> RedisAsyncConnector:
    conn = kew.aio.connect(url)
    assert kew.aio.route(conn) == "native"
    assert isinstance(conn, RedisAsyncConnector)
    return conn


def _ids(raw: redis.Redis, queue: str) -> list[str]:
    """The message ids in the queue's stream, as another client sees them."""
    return [f[b"id"].decode() for _, f in raw.xrange(f"aiotest:{{{queue}}}")]


# -- sends share round trips ---------------------------------------------------------


def test_a_thousand_concurrent_sends_share_round_trips_and_each_returns_once_stored(
    raw: redis.Redis,
) -> None:
    async def main() -> None:
        conn = _native()
        await conn.declare("many")
        await conn.declare("other")
        many, other = await conn.producer("many"), await conn.producer("other")
        before = conn.sends.flushes
        checked: list[str] = []

        async def send(i: int) -> None:
            m = Message(f"m{i}", b"%d" % i)
            await (many if i % 2 else other).send(m)
            if i % 100 == 0:  # stored once the await returns: another client sees it
                assert m.id in _ids(raw, "many" if i % 2 else "other")
                checked.append(m.id)

        await asyncio.gather(*(send(i) for i in range(1000)))
        used = conn.sends.flushes - before
        assert 1 <= used <= 20, f"{used} round trips for 1,000 concurrent sends"
        assert len(checked) == 10
        assert len(_ids(raw, "many")) == len(_ids(raw, "other")) == 500
        # send_many, send_to and a delayed send in one round trip with the rest
        before = conn.sends.flushes
        await asyncio.gather(
            many.send_many([Message("a", b"1"), Message("b", b"2")]),
            conn.send_to([("many", Message("c", b"3")), ("other", Message("d", b"4"))]),
            other.send(Message("later", b"5", deliver_at=now_ms() + 60_000)),
        )
        assert conn.sends.flushes - before == 1
        assert _ids(raw, "many")[-3:] == ["a", "b", "c"] and _ids(raw, "other")[-1] == "d"
        assert raw.zcard("aiotest:{other}:delayed") == 1
        await conn.close()

    _run(main)


def test_an_error_reply_fails_only_the_sends_it_belongs_to(raw: redis.Redis) -> None:
    """The stream key of one queue holds a string (WRONGTYPE): its send
    raises ConfigError; the send that shared its round trip is stored."""

    async def main() -> None:
        conn = _native()
        raw.set("aiotest:{broken}", "not a stream")
        broken, fine = await conn.producer("broken"), await conn.producer("fine")
        before = conn.sends.flushes
        results = await asyncio.gather(
            broken.send(Message("x", b"1")), fine.send(Message("y", b"2")), return_exceptions=True
        )
        assert conn.sends.flushes - before == 1
        assert isinstance(results[0], kew.ConfigError) and "WRONGTYPE" in str(results[0])
        assert results[1] is None and _ids(raw, "fine") == ["y"]
        with pytest.raises(kew.MessageTooLarge):  # checked before anything is sent
            await fine.send(Message("z", b"x" * (conn.max_message_size + 1)))
        await conn.close()

    _run(main)


def test_the_sends_to_a_stream_go_in_order_as_the_sync_provider_writes_them(
    raw: redis.Redis,
) -> None:
    """A flush adds each stream's messages in one EVAL (at most
    BATCH_MOST a script): 2,500 in one round trip, in order, each entry
    what the sync provider writes (fields, headers JSON)."""

    async def main() -> None:
        conn = _native()
        p = await conn.producer("order")
        sent = [Message(f"o{i}", b"%d" % i, {"k": "v", "n": i}) for i in range(2500)]
        before = conn.sends.flushes
        await asyncio.gather(p.send_many(sent[:2000]), p.send(sent[2000]), p.send_many(sent[2001:]))
        assert conn.sends.flushes - before == 1
        assert _ids(raw, "order") == [m.id for m in sent]
        conn.sync.send_to([("order", Message("s", b"7", {"k": "v", "n": 7}))])  # the sync route
        entries: Any = raw.xrange("aiotest:{order}")
        assert entries[7][1] == {b"id": b"o7", b"body": b"7", b"headers": b'{"k":"v","n":7}'}
        assert entries[-1][1] == {**entries[7][1], b"id": b"s"}
        await conn.close()

    _run(main)


def test_a_user_refused_scripts_gets_an_xadd_a_message(own_redis: int) -> None:
    """An ACL without @scripting: the first flush's EVAL is refused, and
    from then on the connector sends a plain XADD a message (nothing lost,
    nothing twice, no error)."""
    admin = redis.Redis(port=own_redis, password=PASSWORD)
    admin.acl_setuser(
        "noscript",
        enabled=True,
        passwords=["+nspw"],
        keys=["*"],
        categories=["+@all", "-@scripting"],
    )

    async def main() -> None:
        conn = _native(f"redis://noscript:nspw@127.0.0.1:{own_redis}/0?prefix=aiotest")
        p = await conn.producer("plain")
        await asyncio.gather(*(p.send(Message(f"p{i}", b"1")) for i in range(10)))
        await p.send(Message("after", b"2"))
        entries: Any = admin.xrange("aiotest:{plain}")
        assert [f[b"id"].decode() for _, f in entries] == [f"p{i}" for i in range(10)] + ["after"]
        await conn.close()

    try:
        _run(main)
    finally:
        admin.close()


def test_min_replicas_waits_for_replicas_the_server_does_not_have(raw: redis.Redis) -> None:
    """WAIT follows the shared round trip on its connection: the machine's
    Redis has no replica, so the sends raise SendError, stored all the same."""

    async def main() -> None:
        conn = _native(URL + "&min_replicas=1&replica_timeout=0.05")
        p = await conn.producer("waiting")
        results = await asyncio.gather(
            p.send(Message("a", b"1")), p.send_many([Message("b", b"2")]), return_exceptions=True
        )
        for e in results:
            assert isinstance(e, kew.SendError) and "0 of min_replicas=1" in str(e), e
        assert sorted(_ids(raw, "waiting")) == ["a", "b"]
        await conn.close()

    _run(main)


# -- fetching, cancellation, leases --------------------------------------------------


def test_a_fetch_cancelled_after_its_read_hands_the_entry_back_at_once(
    raw: redis.Redis,
) -> None:
    """The fetch's XREADGROUP has delivered the entry (pending under its
    consumer) when the fetch is cancelled: the reply is lost, and the entry
    is handed back at once (lease 600 s: not by its expiry)."""

    async def main() -> None:
        conn = _native(URL + "&lease=600")
        await conn.declare("cancel")
        first = await conn.consumer("cancel", 1)
        assert isinstance(first, RedisAsyncConsumer)
        # No housekeeping for a minute: the fetch blocks in one XREADGROUP
        # for its whole timeout (else it wakes every 250 ms).
        first._housekeeping.at = now_ms() + 60_000
        fetch = asyncio.create_task(first.fetch(1, 5.0))
        await asyncio.sleep(0.3)
        # Sent, and waited for, without an await: the loop is held until the
        # entry is pending, so the fetch task cannot read the reply before
        # it is cancelled.
        raw.xadd("aiotest:{cancel}", {"id": "m1", "body": b"1", "headers": b"{}"})
        deadline = time.monotonic() + 5
        while not raw.xpending("aiotest:{cancel}", "kew")["pending"]:
            assert time.monotonic() < deadline, "XREADGROUP did not deliver the entry"
            time.sleep(0.005)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        second = await conn.consumer("cancel", 1)
        got = await eventually(lambda: second.fetch(1, 0.5), 10, "the entry handed back")
        assert got[0].message.id == "m1" and got[0].delivery_count == 2
        await second.ack(got[0])
        await second.close()
        await first.close()
        assert raw.xlen("aiotest:{cancel}") == 0
        await conn.close()

    _run(main)


def test_fetches_wait_on_the_loop_and_a_cancelled_wait_keeps_nothing(raw: redis.Redis) -> None:
    async def main() -> None:
        conn = _native(URL + "&lease=600")
        await conn.declare("idle")
        consumers = [await conn.consumer("idle", 1) for _ in range(4)]
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        fetches = [asyncio.create_task(c.fetch(1, 1.0)) for c in consumers]
        assert await asyncio.gather(*fetches) == [[], [], [], []]  # 1 s, side by side
        ticker.cancel()
        assert ticks >= 20, f"the loop ran {ticks} timers of 10 ms in 1 s of fetches"
        waiting = asyncio.create_task(consumers[0].fetch(1, 30.0))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await (await conn.producer("idle")).send(Message("m", b"1"))
        got = await eventually(lambda: consumers[1].fetch(1, 0.5), 10, "the message")
        assert got[0].delivery_count == 1  # nobody took it before
        await consumers[1].ack(got[0])
        for c in consumers:
            await c.close()
        await conn.close()

    _run(main)


def test_a_held_delivery_keeps_its_lease_until_released(raw: redis.Redis) -> None:
    async def main() -> None:
        conn = _native(URL + "&lease=1")
        await conn.declare("lease")
        await (await conn.producer("lease")).send(Message("m", b"1"))
        holder, other = await conn.consumer("lease", 1), await conn.consumer("lease", 1)
        (held,) = await eventually(lambda: holder.fetch(1, 0.5), 10, "the message")
        assert await other.fetch(1, 2.5) == []  # 2.5 leases long: renewed, not stolen
        await holder.release(held)
        again = await eventually(lambda: other.fetch(1, 0.5), 10, "the released message")
        assert again[0].message.id == "m" and again[0].delivery_count == 2
        await other.ack(again[0])
        await holder.ack(held)  # settled already (released): a no-op
        for c in (holder, other):
            await c.close()
        assert raw.xlen("aiotest:{lease}") == 0
        await conn.close()

    _run(main)


def test_concurrent_acks_share_round_trips(raw: redis.Redis) -> None:
    async def main() -> None:
        conn = _native()
        await conn.declare("acks")
        await (await conn.producer("acks")).send_many(
            [Message(f"m{i}", b"%d" % i) for i in range(200)]
        )
        consumer = await conn.consumer("acks", 200)
        assert isinstance(consumer, RedisAsyncConsumer)
        held: list[Any] = []
        while len(held) < 200:
            held += await consumer.fetch(200 - len(held), 1.0)
        flushes = consumer._acks.flushes
        await asyncio.gather(*(consumer.ack(d) for d in held))
        assert 1 <= consumer._acks.flushes - flushes <= 5
        assert raw.xlen("aiotest:{acks}") == 0
        assert raw.xpending("aiotest:{acks}", "kew")["pending"] == 0
        await consumer.close()
        await conn.close()

    _run(main)


# -- errors ------------------------------------------------------------------------------


def test_errors_on_the_async_route_are_kews(own_redis: int) -> None:
    async def main() -> None:
        closed = _native(f"redis://127.0.0.1:{free_port()}/0?retries=1")
        with pytest.raises(kew.BrokerUnavailable, match=r"after 2 attempt\(s\)"):
            await (await closed.producer("q")).send(Message("m", b"1"))
        with pytest.raises(kew.BrokerUnavailable, match=r"after 2 attempt\(s\)"):
            await closed.declare("q")
        await closed.close()
        refused = _native(f"redis://:wrong@127.0.0.1:{own_redis}/0")
        with pytest.raises(kew.AccessRefused, match="refused the credentials"):
            await (await refused.producer("q")).send(Message("m", b"1"))
        await refused.close()
        ok = _native(f"redis://:{PASSWORD}@127.0.0.1:{own_redis}/0")
        consumer = await ok.consumer("q", 1)
        admin = redis.Redis(port=own_redis, password=PASSWORD)
        admin.config_set("requirepass", "changed")
        admin.client_kill_filter(_type="normal", skipme=True)
        admin.close()
        with pytest.raises(ConsumerFailed, match="cannot go on"):
            await consumer.fetch(1, 5.0)
        await consumer.close()
        await ok.close()

    _run(main)


def test_one_connector_sends_from_several_event_loops(raw: redis.Redis) -> None:
    """kew.task's submit_async sends through one async connector from any
    loop: each loop has its own client and group commit, two at once in two
    threads included, and one after the other."""
    conn = _native()
    queue = f"loops-{os.urandom(3).hex()}"

    async def send(prefix: str, n: int) -> None:
        p = await conn.producer(queue)
        await asyncio.gather(*(p.send(Message(f"{prefix}{i}", b"x")) for i in range(n)))
        await conn.send_to([(queue, Message(f"{prefix}-to", b"y"))])

    threads = [threading.Thread(target=asyncio.run, args=(send(t, 300),)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    asyncio.run(send("c", 1))
    ids = _ids(raw, queue)
    assert len(ids) == 604 and len(set(ids)) == 604  # 2 x 300 + 1 sent, 3 send_to
    assert {"a-to", "b-to", "c0", "c-to"} <= set(ids)
    asyncio.run(conn.close())


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The sends are packed by kew (cheaper than redis-py's pipeline): byte
    for byte what redis-py's connection writes."""
    from redis.asyncio.connection import Connection

    from kew_redis._aio_writes import ADD_ALL, Batch, pack

    conn = Connection()
    for args in [
        ("XADD", "kew:{q}", "*", "id", "ü-1", "body", b"\x00" * 300, "headers", b"{}"),
        ("ZADD", "kew:{q}:delayed", 1_700_000_000_000, b"3:abc2:{}x"),
        ("WAIT", 1, 2000),
        ("SET", "k", 2.5),
    ]:
        assert pack(args) == b"".join(conn.pack_command(*args)), args
    with pytest.raises(redis.DataError):
        pack(("SET", "k", True))
    batch = Batch("kew:{q}")
    batch.add("ü-1", b"\x00" * 300, b"{}")
    batch.add("m2", b"x", b'{"a":1}')
    args = ("EVAL", ADD_ALL, 1, "kew:{q}", "ü-1", b"\x00" * 300, b"{}", "m2", b"x", b'{"a":1}')
    assert batch.part().packed == b"".join(conn.pack_command(*args))


def test_options_redis_asyncio_cluster_does_not_take_are_refused_at_first_use() -> None:
    """No I/O: the ConfigError comes from the first operation, naming them."""
    conn = kew.aio.connect("rediss://127.0.0.1:1,127.0.0.1:2/?ssl_password=secret&retries=0")

    async def main() -> None:
        with pytest.raises(kew.ConfigError, match="does not take ssl_password") as e:
            await conn.declare("q")
        assert "secret" not in str(e.value)
        await conn.close()

    _run(main)
