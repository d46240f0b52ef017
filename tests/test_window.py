"""The adaptive window (kew.qchan._window) and grouped acks of plain sinks:
the sizing policy on a fake clock; then real subscriptions on memory,
SQLite and Redis, whose window grows above the concurrency under a stream
of no-op messages and comes back to it when the handlers turn slow."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import kew
from kew.qchan import _window
from kew.qchan._window import Window, WindowPolicy, cap
from kew.qchan.runtime import Subscription
from kew.qchan.spi import Consumer, Delivery, Message, WindowedConsumer
from kew.testing.util import port_open, require, wait_for

# -- the policy, on a fake clock -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _period(
    policy: WindowPolicy,
    clock: Clock,
    *,
    ran: float | None = None,
    settle: float = 0.0,
    fetch: float = 0.0,
    n: int = 50,
    running: int = 0,
) -> int | None:
    """One period of ``n`` handlers that took ``ran`` s, then the decision."""
    for _ in range(n if ran is not None else 0):
        policy.ran(ran or 0.0)
        policy.settled(settle)
        policy.fetched(fetch)
    clock.now += _window.PERIOD
    return policy.update(running)


def test_short_handlers_widen_the_window_by_littles_law() -> None:
    clock = Clock()
    p = WindowPolicy(4, clock=clock)
    assert p.window == 4 and p.update(0) is None  # no period yet
    # 1 ms handlers, 0.5 ms settle + 0.5 ms refill: 4 + 2 * 4000/s * 1 ms = 12
    assert _period(p, clock, ran=0.001, settle=0.0005, fetch=0.0005) == 12
    assert p.window == 12


def test_the_window_is_capped_in_deliveries_and_bytes() -> None:
    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    p.delivered(10, 2000)
    assert _period(p, clock, ran=1e-5, settle=0.01) == cap(2) == _window.MAX_WINDOW == 256
    assert cap(1000) == 1000  # never below the concurrency
    big = WindowPolicy(2, clock=clock)
    big.delivered(4, 4 << 20)  # 1 MiB bodies: 32 at most
    clock.now += _window.MIN_INTERVAL
    assert _period(big, clock, ran=1e-5, settle=0.01) == cap(2, 1 << 20) == 32


def test_slow_handlers_bring_it_back_to_the_concurrency() -> None:
    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    assert _period(p, clock, ran=1e-5, settle=0.001) == 256
    clock.now += _window.MIN_INTERVAL
    assert _period(p, clock, ran=0.05, n=4) == 2  # a mean over SLOW


def test_no_handler_finishing_in_a_period_while_some_run_is_slow() -> None:
    clock = Clock()
    p = WindowPolicy(3, clock=clock)
    assert _period(p, clock, ran=1e-4, settle=0.002) is not None
    clock.now += _window.MIN_INTERVAL
    assert _period(p, clock, running=3) == 3


def test_an_idle_period_changes_nothing() -> None:
    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    wide = _period(p, clock, ran=1e-4, settle=0.002)
    assert wide is not None and wide > 2
    clock.now += 5 * _window.MIN_INTERVAL
    assert _period(p, clock) is None and p.window == wide


def test_hysteresis_interval_and_factor() -> None:
    clock = Clock()
    p = WindowPolicy(4, clock=clock)
    assert _period(p, clock, ran=0.001, settle=0.0005, fetch=0.0005) == 12
    # within MIN_INTERVAL of the change: even a much larger target waits
    assert _period(p, clock, ran=0.0005, settle=0.001, fetch=0.001) is None
    clock.now += _window.MIN_INTERVAL
    assert _period(p, clock, ran=0.0005, settle=0.001, fetch=0.001) == 36
    clock.now += _window.MIN_INTERVAL
    # a target within a factor of 2 (here 27): the window stays
    assert _period(p, clock, ran=0.0007, settle=0.001, fetch=0.001) is None
    assert p.window == 36


def test_the_overhead_estimate_falls_slowly() -> None:
    """A window that ended the waits does not shrink at once for lack of
    them: the overhead falls with a half-life of HALF_LIFE seconds."""
    clock = Clock()
    p = WindowPolicy(1, clock=clock)
    assert _period(p, clock, ran=0.0001, fetch=0.002) == 41
    for _ in range(int(_window.HALF_LIFE / _window.PERIOD / 2)):  # half a half-life
        assert _period(p, clock, ran=0.0001, fetch=0.0) is None
    assert p.window == 41
    for _ in range(int(3 * _window.HALF_LIFE / _window.PERIOD)):
        _period(p, clock, ran=0.0001, fetch=0.0)
    assert p.window < 41 // 2  # long after: smaller


def test_the_first_period_ends_after_a_few_short_handlers() -> None:
    """Before its first change, the window is reconsidered as soon as
    FIRST_RUNS handlers returned (not a whole PERIOD of single round trips);
    after it, only once a period has passed."""
    clock = Clock()
    p = WindowPolicy(1, clock=clock)
    for _ in range(_window.FIRST_RUNS - 1):
        p.ran(1e-5)
        p.fetched(1e-4)
    clock.now += 0.01
    assert p.update(0) is None  # too few yet
    p.ran(1e-5)
    assert p.update(0) == 21  # 1 + 2 * 1e5/s * 0.1 ms
    clock.now += _window.MIN_INTERVAL
    assert p.update(0) is None  # (an idle period)
    p.ran(1e-5, _window.FIRST_RUNS * 10)
    p.fetched(1e-3)
    clock.now += 0.01
    assert p.update(0) is None  # within a period of the last decision
    clock.now += _window.PERIOD
    assert p.update(0) == 201


def test_slow_first_handlers_keep_the_window_at_the_concurrency() -> None:
    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    p.ran(0.03, _window.FIRST_RUNS)
    clock.now += 0.01
    assert p.update(2) is None and p.window == 2


def test_a_refused_change_is_undone() -> None:
    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    assert _period(p, clock, ran=1e-5, settle=0.001) == 256
    p.undo(2)
    assert p.window == 2


def test_the_window_in_effect_fetches_by_the_quarter_and_grows_once_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pinned = Window("q", 2, 16)
    assert pinned.policy is None and pinned.adapt(0) is None and pinned.grouped
    # Every handler busy: a fetch once a quarter of the window (4) is free.
    assert pinned.room(2 + 11, 0) == 0 and pinned.room(2 + 10, 2) == 0
    assert pinned.room(2 + 8, 2) == 4
    assert pinned.room(1, 12) == 3  # a handler idle: whatever room there is
    assert pinned.room(1, 15) == 0

    clock = Clock()
    p = WindowPolicy(2, clock=clock)
    w = Window("q", 2, policy=p)
    assert w.size == 2 and not w.grouped
    p.ran(1e-5, 50)
    p.settled(0.001, 50)
    clock.now += _window.PERIOD
    assert w.adapt(0) == (2, 256) and w.size == 2  # larger: not before it is granted
    w.refused(2, 256, OSError("no"))
    assert w.size == 2 and p.window == 2
    assert "kew: q: the window could not change from 2 to 256: no" in caplog.messages
    clock.now += _window.MIN_INTERVAL
    p.ran(1e-5, 50)
    clock.now += _window.PERIOD
    assert w.adapt(0) == (2, 256) and w.granted(2, 256)
    assert w.size == 256 and w.grouped and w.room(2, 0) == 254
    assert w.room(192, 0) == 64 and w.room(192, 1) == 0  # a quarter: 64
    clock.now += _window.MIN_INTERVAL
    p.ran(0.05, 4)
    clock.now += _window.PERIOD
    assert w.adapt(2) == (256, 2) and w.size == 2  # smaller: at once
    w.refused(256, 2, OSError("no"))  # (the consumer keeps its larger one: harmless)
    assert w.size == 2 and not w.granted(256, 2)


# -- real subscriptions ----------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/w.sqlite3"
    require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def queue(url: str) -> Iterator[kew.Queue[int]]:
    conn = kew.connect(url)
    q = kew.Queue(conn, f"w.{os.urandom(4).hex()}", int)
    yield q
    conn.delete(q.name)
    conn.close()


def test_window_grows_for_no_ops_and_comes_back_for_slow_handlers(queue: kew.Queue[int]) -> None:
    probe = queue.connector.consumer(queue.name, 1)
    windowed = isinstance(probe, WindowedConsumer)
    probe.close()
    if not windowed:
        pytest.skip(f"{queue.connector.url}: its consumer has no set_prefetch (WindowedConsumer)")
    slow = threading.Event()
    stop = threading.Event()

    def handle(_: int) -> None:
        if slow.is_set():
            time.sleep(0.03)  # the handler's work (slow: over _window.SLOW)

    def produce() -> None:  # a steady stream
        while not stop.wait(0.005):
            queue.send_many(range(50))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    sub = queue.sink(handle, concurrency=2)
    try:
        assert sub.adaptive and sub.window == 2
        wait_for(lambda: sub.window > 2, 10, what="a window above the concurrency")
        assert sub.window <= cap(2)
        slow.set()
        wait_for(lambda: sub.window == 2, 10, what="the window back to the concurrency")
        # What was fetched while it was wide runs here (not handed back);
        # once that is done, 2 at most are held.
        wait_for(lambda: sub.in_flight <= 2, 30, what="the deliveries fetched before drained")
        seen = [sub.in_flight for _ in range(20)]
        assert max(seen) <= 2 and sub.window == 2
    finally:
        stop.set()
        producer.join(5)
        sub.stop(5)


def test_prefetch_pins_the_window(queue: kew.Queue[int]) -> None:
    queue.send_many(range(500))
    done = threading.Event()
    count = [0]

    def handle(_: int) -> None:
        count[0] += 1
        if count[0] == 500:
            done.set()

    with queue.sink(handle, prefetch=3) as sub:
        assert done.wait(30)
        assert not sub.adaptive and sub.window == sub.prefetch == 3


class _Counting:
    """A real consumer that notes each settle and ack (no set_prefetch:
    its window cannot change)."""

    def __init__(self, consumer: Consumer, returned: list[str]) -> None:
        self.consumer = consumer
        self.returned = returned
        self.commits: list[list[str]] = []
        self.early: list[str] = []  # acked before its handler returned

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        return self.consumer.fetch(max_count, timeout)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        ids = [d.message.id for d in acks]
        self.early += [i for i in ids if i not in self.returned]
        self.commits.append(ids)
        for d in acks:
            self.consumer.ack(d)

    def ack(self, delivery: Delivery) -> None:
        self.settle([delivery], [])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.consumer.dead_letter(delivery, reason)

    def release(self, delivery: Delivery) -> None:
        self.consumer.release(delivery)

    def close(self) -> None:
        self.consumer.close()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_acks_commit_in_groups_each_after_its_handler(concurrency: int) -> None:
    """A window of 16: the acks are committed many per commit, none before
    its handler returned; with one handler (run on the fetch thread) by the
    fetch thread itself once its batch is run, with more by the group's
    thread."""
    conn = kew.connect("memory://")
    name = f"w.acks-{os.urandom(4).hex()}"
    conn.declare(name)
    n = 2000
    conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(n)])
    returned: list[str] = []
    consumer = _Counting(conn.consumer(name, 16), returned)
    threads: set[str] = set()
    real = consumer.settle

    def settle(acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        threads.add(threading.current_thread().name)
        real(acks, sends)

    consumer.settle = settle  # type: ignore[method-assign]
    lock = threading.Lock()

    def handle(_: Consumer, d: Delivery) -> bool:
        with lock:
            returned.append(d.message.id)
        return True

    sub = Subscription(consumer, handle, name=name, concurrency=concurrency, prefetch=16)
    try:
        wait_for(lambda: sum(map(len, consumer.commits)) == n, 20, what=f"{n} acks")
    finally:
        sub.stop(5)
    acked = [i for ids in consumer.commits for i in ids]
    assert sorted(acked) == sorted(f"m{i}" for i in range(n))  # each once
    assert len(consumer.commits) < n // 2  # in groups
    assert consumer.early == []
    assert threads == {f"kew-fetch-{name}" if concurrency == 1 else f"kew-ack-{name}"}
    assert conn.browser(name).stats().in_flight == 0
    conn.close()


def test_a_failed_group_commit_on_the_fetch_thread_hands_the_group_back() -> None:
    """One handler, a window of 10: the first group commit fails; its
    deliveries are handed back and come again (each handled twice, acked
    once), none lost, nothing left held."""
    conn = kew.connect("memory://")
    name = f"w.fail-{os.urandom(4).hex()}"
    conn.declare(name)
    n = 100
    conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(n)])
    returned: list[str] = []
    consumer = _Counting(conn.consumer(name, 10), returned)
    real = consumer.settle
    failed: list[str] = []

    def settle(acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        if not failed:
            failed.extend(d.message.id for d in acks)
            raise ConnectionError("the commit is lost")
        real(acks, sends)

    consumer.settle = settle  # type: ignore[method-assign]

    def handle(_: Consumer, d: Delivery) -> bool:
        returned.append(d.message.id)
        return True

    sub = Subscription(consumer, handle, name=name, prefetch=10)
    try:
        wait_for(lambda: sum(map(len, consumer.commits)) == n, 20, what=f"{n} acks")
        wait_for(lambda: sub.in_flight == 0, 5, what="nothing held")
    finally:
        sub.stop(5)
    acked = [i for ids in consumer.commits for i in ids]
    assert sorted(acked) == sorted(f"m{i}" for i in range(n))  # each once, none lost
    assert len(failed) > 1 and all(returned.count(i) == 2 for i in failed)
    assert conn.browser(name).stats().in_flight == 0
    conn.close()


def test_stop_in_a_batch_on_the_fetch_thread_commits_what_returned() -> None:
    """One handler, a window of 50; stop() comes while the 10th handler
    runs: the acks of the 10 that returned are committed, the other 40 of
    the batch are handed back (ready again), nothing is held."""
    conn = kew.connect("memory://")
    name = f"w.istop-{os.urandom(4).hex()}"
    conn.declare(name)
    conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(50)])
    returned: list[str] = []
    consumer = _Counting(conn.consumer(name, 50), returned)
    stopping = threading.Event()
    subs: list[Subscription] = []
    made = threading.Event()
    outcome: list[bool] = []

    def handle(_: Consumer, d: Delivery) -> bool:
        made.wait(5)  # (subs[0] is there)
        if len(returned) == 9:
            threading.Thread(target=lambda: outcome.append(subs[0].stop(10))).start()
            wait_for(lambda: subs[0]._stopping, 5, what="stopping")
            stopping.set()
        returned.append(d.message.id)
        return True

    subs.append(Subscription(consumer, handle, name=name, prefetch=50))
    made.set()
    wait_for(lambda: bool(outcome), 15, what="stop() returned")
    assert stopping.is_set() and outcome == [True]
    acked = [i for ids in consumer.commits for i in ids]
    assert sorted(acked) == sorted(returned) and len(returned) == 10
    assert consumer.early == []
    stats = conn.browser(name).stats()
    assert stats.in_flight == 0 and stats.ready == 40
    conn.close()


def test_no_slack_no_group() -> None:
    """A window of the concurrency (here a consumer whose window cannot
    change): each ack at once, on the handler's thread, before its slot is
    free (a group would only add a thread hop to every delivery)."""
    conn = kew.connect("memory://")
    name = f"w.inline-{os.urandom(4).hex()}"
    conn.declare(name)
    conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(20)])
    returned: list[str] = []
    threads: set[str] = set()
    consumer = _Counting(conn.consumer(name, 1), returned)
    real = consumer.ack

    def ack(delivery: Delivery) -> None:
        threads.add(threading.current_thread().name)
        real(delivery)

    consumer.ack = ack  # type: ignore[method-assign]

    def handle(_: Consumer, d: Delivery) -> bool:
        returned.append(d.message.id)
        return True

    sub = Subscription(consumer, handle, name=name)
    try:
        wait_for(lambda: len(consumer.commits) == 20, 10, what="20 acks")
        assert not sub.adaptive and sub.window == 1
    finally:
        sub.stop(5)
    assert threads == {f"kew-fetch-{name}"} and consumer.early == []
    conn.close()


def test_acks_handed_over_are_committed_at_stop() -> None:
    conn = kew.connect("memory://")
    name = f"w.stop-{os.urandom(4).hex()}"
    conn.declare(name)
    conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(50)])
    gate = threading.Event()
    returned: list[str] = []
    consumer = _Counting(conn.consumer(name, 50), returned)
    real = consumer.settle

    def slow_settle(acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        gate.wait(10)  # every ack waits: they pile up, handed over
        real(acks, sends)

    consumer.settle = slow_settle  # type: ignore[method-assign]

    def handle(_: Consumer, d: Delivery) -> bool:
        returned.append(d.message.id)
        return True

    sub = Subscription(consumer, handle, name=name, concurrency=2, prefetch=50)
    wait_for(lambda: len(returned) == 50, 10, what="50 handled")
    assert sub.in_flight == 50  # handled, acks not committed: still held
    threading.Timer(0.3, gate.set).start()
    assert sub.stop(grace=10) is True  # waited for the acks, committed them
    assert sorted(i for ids in consumer.commits for i in ids) == sorted(returned)
    assert conn.browser(name).stats().in_flight == 0
    conn.close()


# -- liveness (kew.qchan._liveness, shared by both runtimes) ---------------------------


def test_a_subscription_that_delivers_nothing_while_work_waits_is_stalled() -> None:
    """Work waiting (``waiting`` says so), room, nothing delivered for
    ``stall_after``: alive, but not healthy; the sync runtime here."""
    conn = kew.connect("memory://")
    name = f"w.stall-{os.urandom(4).hex()}"
    conn.declare(name)
    ready = [3]  # what the broker would say waits (on a queue this one does not read)
    sub = Subscription(
        conn.consumer(name, 1),
        lambda c, d: True,
        name=name,
        poll_interval=0.05,
        waiting=lambda: ready[0],
        stall_after=0.3,
    )
    try:
        assert sub.alive and sub.healthy()  # the watch starts
        wait_for(lambda: not sub.healthy(), 5, what="stalled")
        assert sub.alive  # (alive: its loop runs; stalled: it delivers nothing)
        ready[0] = 0
        assert sub.healthy()  # nothing waits: not stalled
    finally:
        sub.stop(1)
        conn.close()


def test_the_asyncio_runtime_tells_the_same() -> None:
    import asyncio

    from kew.aio._runtime import Subscription as AsyncSubscription

    conn = kew.connect("memory://")
    name = f"w.astall-{os.urandom(4).hex()}"
    conn.declare(name)
    ready = [3]

    async def waiting() -> int:
        return ready[0]

    async def handle(c: object, d: Delivery) -> None:
        raise AssertionError("nothing is delivered")

    async def main() -> None:
        aconn = conn.aio()  # type: ignore[attr-defined]
        sub = AsyncSubscription(
            lambda prefetch: aconn.consumer(name, prefetch),
            handle,
            name=name,
            poll_interval=0.05,
            waiting=waiting,
            stall_after=0.3,
        )
        await sub
        try:
            assert sub.alive and await sub.healthy()
            deadline = time.monotonic() + 5
            while await sub.healthy():
                assert time.monotonic() < deadline, "never stalled"
                await asyncio.sleep(0.05)
            assert sub.alive
            ready[0] = 0
            assert await sub.healthy()
        finally:
            await sub.stop(1)

    try:
        asyncio.run(main())
    finally:
        conn.close()
