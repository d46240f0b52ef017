"""Submitting tasks (kew.task._submit): a task and its ``queued`` event in
one round trip (``MultiSender.send_to``), ``submit_many``, concurrent
submits sharing round trips, errors reaching their caller, and
``submit_async`` from an event loop; on memory://, SQLite, the machine's
Redis and RabbitMQ (skipped if unreachable, required under CI=true), and
RabbitMQ-STOMP for the fallback (a connector without ``send_to``)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kew
import kew.aio
from kew.qchan.spi import KewError, MessageTooLarge, MultiSender, QueueFull, now_ms
from kew.task import App, MemoryTaskStore, TaskQueue
from kew.task._submit import submitter
from kew.testing.util import port_open, require, wait_for

LIMIT = 64 * 1024  # max_message_size of every URL here
URLS = {
    "memory": f"memory://submit?max_message_size={LIMIT}",
    "redis": f"redis://127.0.0.1:6379/0?max_message_size={LIMIT}",
    "rabbitmq": f"amqp://guest:guest@127.0.0.1:5672/?max_message_size={LIMIT}",
    "stomp": f"stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&max_message_size={LIMIT}",
}
PORTS = {"redis": 6379, "rabbitmq": 5672, "stomp": 61613}


class Job(msgspec.Struct, frozen=True):
    n: int
    payload: str = ""


def _suffix() -> str:
    return os.urandom(4).hex()


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/q.sqlite3?max_message_size={LIMIT}"
    if kind in PORTS:
        require(port_open("127.0.0.1", PORTS[kind]), f"{kind} is not running on 127.0.0.1")
    return URLS[kind]


@pytest.fixture(params=["memory", "sqlite", "redis", "rabbitmq"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request.param, tmp_path)


def _app(url: str) -> App:
    return App(url, store=MemoryTaskStore(), events_queue=f"test.submit-ev-{_suffix()}")


def _drop(app: App) -> None:
    names = app.queue_names()
    try:
        if not app.connector.url.startswith("stomp"):  # (RabbitMQ-STOMP deletes no queue)
            for name in names:
                app.connector.delete(name)  # (delay queues too: this connector made them)
    finally:
        app.close()


@pytest.fixture
def app(url: str) -> Iterator[App]:
    a = _app(url)
    yield a
    _drop(a)


def _queue(app: App) -> TaskQueue[Job]:
    return app.task_queue(f"t.submit-{_suffix()}", Job, lambda job: None)


def _count_round_trips(app: App) -> list[int]:
    """Wrap the connector's ``send_to`` (kew's own object) to count calls."""
    conn: Any = app.connector
    assert isinstance(conn, MultiSender), f"{conn!r} has no send_to"
    real: Callable[..., None] = conn.send_to
    calls = [0]

    def counted(sends: Any) -> None:
        calls[0] += 1
        real(sends)

    conn.send_to = counted
    return calls


def _recorded(app: App, ids: list[str], timeout: float = 20) -> None:
    """Run a recorder until every task of ``ids`` is in the store, queued."""
    sub = app.recorder()
    try:

        def all_queued() -> bool:
            return all((r := app.status(i)) is not None and r.status == "queued" for i in ids)

        wait_for(all_queued, timeout, what=f"{len(ids)} tasks recorded as queued")
    finally:
        sub.stop()


def test_submit_sends_task_and_queued_event_in_one_round_trip(app: App) -> None:
    tq = _queue(app)
    trips = _count_round_trips(app)
    task_id = tq.submit(Job(1))
    assert trips[0] == 1
    assert tq.queue.browser().stats().ready == 1
    assert app.events.browser().stats().ready == 1
    _recorded(app, [task_id])
    # id= and delay= as before: the task is not ready, its event says when it is due
    before = now_ms()
    assert tq.submit(Job(2), id="my-task-id", delay=60) == "my-task-id"
    assert trips[0] == 2
    assert tq.queue.browser().stats().ready == 1  # the delayed one waits elsewhere
    _recorded(app, ["my-task-id"])
    record = app.status("my-task-id")
    assert record is not None and record.next_at is not None
    assert record.next_at >= before + 60_000


def test_submit_many_one_round_trip_one_event_message(app: App) -> None:
    tq = _queue(app)
    trips = _count_round_trips(app)
    ids = tq.submit_many([Job(i) for i in range(100)])
    assert len(ids) == len(set(ids)) == 100
    assert trips[0] == 1
    assert tq.queue.browser().stats().ready == 100
    assert app.events.browser().stats().ready == 1  # the 100 events packed in one message
    assert tq.submit_many([]) == []
    _recorded(app, ids)
    # a bad item sends nothing (validated first)
    with pytest.raises(kew.DecodeError):
        tq.submit_many([Job(1), {"n": "not an int"}])  # type: ignore[list-item]
    assert trips[0] == 1


def test_submit_many_events_fit_max_message_size() -> None:
    app = App("memory://small?max_message_size=4096", store=MemoryTaskStore())
    try:
        tq = _queue(app)
        ids = tq.submit_many([Job(i) for i in range(100)])  # ~11 kB of events
        assert app.events.browser().stats().ready >= 3
        _recorded(app, ids)
    finally:
        _drop(app)


def test_threads_share_round_trips(app: App) -> None:
    tq = _queue(app)
    tq.submit(Job(-1))  # connected and declared before the threads start
    trips = _count_round_trips(app)
    threads, each = 16, 50
    start = threading.Barrier(threads)
    ids: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        start.wait()
        try:
            ids[k] = [tq.submit(Job(k * each + i)) for i in range(each)]
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors
    every = [i for chunk in ids for i in chunk]
    assert len(every) == len(set(every)) == threads * each
    assert tq.queue.browser().stats().ready == threads * each + 1  # each task once
    assert 1 <= trips[0] <= threads * each
    if not app.connector.url.startswith("memory"):  # (memory: no round trip to share)
        assert trips[0] < threads * each, f"{trips[0]} round trips for {threads * each} submits"
    print(f"\n{app.connector.url}: {threads * each} submits in {trips[0]} round trips")
    _recorded(app, every)


def test_a_failing_submit_raises_in_its_caller_and_stores_nothing(app: App) -> None:
    tq = _queue(app)
    tq.submit(Job(1))
    with pytest.raises(MessageTooLarge):
        tq.submit(Job(2, payload="x" * (LIMIT + 1)))
    with pytest.raises(MessageTooLarge):
        tq.submit_many([Job(3), Job(4, payload="x" * (LIMIT + 1))])
    # other threads submitting meanwhile are not hurt by one caller's error
    good: list[str] = []
    bad: list[BaseException] = []

    def submit(k: int) -> None:
        try:
            good.append(tq.submit(Job(k, payload="x" * (LIMIT + 1) if k % 4 == 0 else "")))
        except MessageTooLarge as e:
            bad.append(e)

    workers = [threading.Thread(target=submit, args=(k,)) for k in range(1, 17)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert (len(good), len(bad)) == (12, 4)
    assert tq.queue.browser().stats().ready == 13
    _recorded(app, good)


def test_a_queue_with_max_depth_takes_the_old_road(app: App) -> None:
    tq = _queue(app)
    tq.queue.max_depth = 2
    trips = _count_round_trips(app)
    first = tq.submit(Job(1))
    tq.submit_many([Job(2)])
    with pytest.raises(QueueFull):
        tq.submit(Job(3))
    with pytest.raises(QueueFull):
        tq.submit_many([Job(4)])
    assert trips[0] == 0  # the queue's depth is checked before each send
    assert tq.queue.browser().stats().ready == 2
    _recorded(app, [first])


def test_sqlite_closed_connector_raises(tmp_path: Path) -> None:
    conn = kew.connect(f"sqlite:///{tmp_path}/q.sqlite3")
    app = App(conn, store=MemoryTaskStore())
    tq = _queue(app)
    tq.submit(Job(1))
    conn.close()
    with pytest.raises(KewError, match="closed"):
        tq.submit(Job(2))
    app.close()


class _Lag:
    """The worst delay of a 1 ms timer on the running loop."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - t0 - 0.001)


def test_submit_async(app: App) -> None:
    tq = _queue(app)

    async def main() -> tuple[list[str], list[str], float]:
        await tq.submit_async(Job(0))  # the route made, the queues declared
        lag = _Lag()
        probe = asyncio.create_task(lag.probe())
        await asyncio.sleep(0)
        ids = await asyncio.gather(*(tq.submit_async(Job(i)) for i in range(1, 201)))
        more = await tq.submit_many_async([Job(i) for i in range(50)], delay=0)
        assert await tq.submit_async(Job(-1), id="async-id") == "async-id"
        with pytest.raises(MessageTooLarge):
            await tq.submit_async(Job(-2, payload="x" * (LIMIT + 1)))
        probe.cancel()
        return list(ids), more, lag.worst

    ids, more, worst = asyncio.run(main())
    assert len(set(ids + more)) == 250
    assert tq.queue.browser().stats().ready == 252
    route = kew.aio.route(submitter(app)._async_connector())
    print(f"\n{app.connector.url}: route {route}, loop lag max {worst * 1000:.1f} ms")
    if app.connector.url.startswith(("memory", "sqlite")):
        assert route == "native"
    assert worst < 0.5, f"the loop was held {worst * 1000:.0f} ms"
    _recorded(app, [*ids, *more, "async-id"])


def test_stomp_falls_back_to_a_send_many_per_queue(tmp_path: Path) -> None:
    conn = kew.connect(_url("stomp", tmp_path))
    assert not isinstance(conn, MultiSender)
    app = App(conn, store=MemoryTaskStore(), events_queue=f"test.submit-ev-{_suffix()}")
    try:
        tq = _queue(app)
        ids = [tq.submit(Job(1)), *tq.submit_many([Job(i) for i in range(10)])]

        async def many() -> list[str]:
            return await tq.submit_many_async([Job(i) for i in range(5)])

        ids += asyncio.run(many())
        assert len(set(ids)) == 16
        _recorded(app, ids)
    finally:
        app.close()
        conn.close()


def test_redis_cluster_send_to_queues_on_several_slots(tmp_path: Path) -> None:
    """On Redis Cluster a task and its event may hash to different slots
    (masters): ``send_to`` stores both in one pipeline without MULTI."""
    from redis.crc import key_slot

    from tests.brokers.redis_cluster import RedisCluster

    require(RedisCluster.available(), "redis-server and redis-cli are not installed")
    cluster = RedisCluster(tmp_path)
    cluster.start()
    try:
        for extra in ("", "&min_replicas=1"):
            app = App(cluster.url + extra, store=MemoryTaskStore(), events_queue="ev-x")
            tq = app.task_queue("tasks-y", Job, lambda job: None)
            conn: Any = app.connector
            slots = {key_slot(conn.keys(q).stream.encode()) for q in ("ev-x", "tasks-y")}
            assert len(slots) == 2
            ids = [tq.submit(Job(0)), *tq.submit_many([Job(i) for i in range(10)])]
            assert tq.queue.browser().stats().ready == 11
            assert app.events.browser().stats().ready == 2
            _recorded(app, ids)
            _drop(app)
    finally:
        cluster.stop()
