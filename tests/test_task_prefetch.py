"""Workers with a prefetch above their concurrency (``--prefetch``), and
attempts settled through the group commit (events / next attempt together
with the ack): on SQLite, Redis and RabbitMQ."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import kew
from kew.qchan.runtime import Subscription
from kew.qchan.spi import Consumer, Delivery, Message
from kew.task import App, Retry, TaskRecord
from kew.testing.util import wait_for
from tests.task_apps import app_fixture, suffix

app = app_fixture(("sqlite", "redis", "rabbitmq"), events="p.events")


def _status(app: App, tid: str, want: str) -> TaskRecord:
    def check() -> TaskRecord | None:
        r = app.status(tid)
        return r if r is not None and r.status == want else None

    r = wait_for(check, 30, what=f"task {tid} to be {want}")
    assert r is not None
    return r


def test_prefetch_above_concurrency_holds_no_more(app: App) -> None:
    gate = threading.Event()
    lock = threading.Lock()
    started: list[int] = []
    failed_once: set[int] = set()

    def handle(n: int) -> None:
        with lock:
            started.append(n)
        gate.wait(30)
        if n == 0 and n not in failed_once:
            failed_once.add(n)
            raise Retry("first attempt of 0 fails", after=0.1)

    tq = app.task_queue(f"p.tasks-{suffix()}", int, handle)
    ids = [tq.submit(n) for n in range(8)]
    w = app.worker(concurrency=2, prefetch=5, record=True).start()
    try:
        sub = next(s for s in w.subscriptions if s.name == tq.name)
        assert sub.prefetch == 5
        wait_for(lambda: sub.in_flight == 5 and len(started) == 2, 20, what="5 held, 2 running")
        seen = [sub.in_flight for _ in range(50)]
        assert max(seen) <= 5, f"held {max(seen)} deliveries with prefetch 5"
        assert len(started) == 2
        gate.set()
        records = [_status(app, tid, "succeeded") for tid in ids]
    finally:
        w.stop(5)
    assert records[0].attempt == 2  # retried through the rescheduling path
    assert all(r.attempt == 1 for r in records[1:])
    assert sorted(started) == [0, *range(8)]
    stats = tq.queue.browser().stats()
    assert stats.ready in (-1, 0) and stats.in_flight in (-1, 0) and stats.delayed in (-1, 0)


def test_prefetch_below_concurrency_is_refused(app: App) -> None:
    app.task_queue("p.refused", int, lambda n: None)
    with pytest.raises(ValueError, match=r"prefetch \(2\) must be >= concurrency \(4\)"):
        app.worker(concurrency=4, prefetch=2)


def test_cli_prefetch_below_concurrency_is_refused(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kew.cli", "worker", "nowhere:app", "-c", "4", "--prefetch", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--prefetch" in r.stderr and "less than --concurrency (4)" in r.stderr


def test_held_deliveries_count_against_prefetch_until_settled() -> None:
    """Subscription.hold: a handler that returns before its delivery is
    settled keeps it counted; no more than prefetch are fetched meanwhile,
    and stop() waits for the settle."""
    conn = kew.connect("memory://")
    name = f"p.hold-{suffix()}"
    conn.declare(name)
    consumer = conn.consumer(name, 3)
    later: list[tuple[Delivery, Callable[[], None]]] = []
    lock = threading.Lock()
    subs: list[Subscription] = []

    def handle(c: object, d: Delivery) -> None:
        with lock:
            later.append((d, subs[0].hold()))

    sub = Subscription(consumer, handle, name=name, concurrency=2, prefetch=3)
    subs.append(sub)
    try:
        conn.producer(name).send_many([Message(f"m{i}", b"x") for i in range(5)])
        wait_for(lambda: len(later) == 3, 10, what="3 handled, held")
        assert sub.in_flight == 3
        seen = [sub.in_flight for _ in range(50)]
        assert max(seen) == 3 and len(later) == 3  # nothing more fetched while held
        d, done = later[0]
        consumer.ack(d)
        done()
        done()  # a second call changes nothing
        wait_for(lambda: len(later) == 4, 10, what="a 4th once one is settled")
        assert sub.in_flight == 3
        stopper = threading.Thread(target=lambda: results.append(sub.stop(grace=10)))
        results: list[bool] = []
        stopper.start()
        for d, done in later[1:]:
            consumer.ack(d)
            done()
        stopper.join(15)
        assert results == [True]  # stop() waited for the held ones, all settled in time
    finally:
        sub.stop(1)
        conn.close()


class _CountingConsumer:
    """A real consumer, with the size of each fetch noted."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.sizes: list[int] = []

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        got = self.consumer.fetch(max_count, timeout)
        if got:
            self.sizes.append(len(got))
        return got

    def ack(self, delivery: Delivery) -> None:
        self.consumer.ack(delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.consumer.dead_letter(delivery, reason)

    def release(self, delivery: Delivery) -> None:
        self.consumer.release(delivery)

    def close(self) -> None:
        self.consumer.close()


def test_busy_handlers_fetch_once_a_quarter_of_prefetch_is_free() -> None:
    """With every handler busy, one settled delivery does not trigger a
    fetch of one: the fetch waits until a quarter of the prefetch (here 2 of
    8) is free, then takes both at once.  (Before, one fetch per freed slot
    cost a Redis round trip per task.)"""
    conn = kew.connect("memory://")
    name = f"p.refill-{suffix()}"
    conn.declare(name)
    consumer = _CountingConsumer(conn.consumer(name, 8))
    gate = threading.Event()
    held: dict[str, tuple[Delivery, Callable[[], None]]] = {}
    lock = threading.Lock()
    subs: list[Subscription] = []

    def handle(c: object, d: Delivery) -> None:
        if d.message.id.startswith("block"):
            gate.wait(30)
            consumer.ack(d)
            return
        with lock:
            held[d.message.id] = (d, subs[0].hold())

    sub = Subscription(consumer, handle, name=name, concurrency=2, prefetch=8, poll_interval=0.1)
    subs.append(sub)
    conn.producer(name).send_many(
        [Message(f"h{i}", b"x") for i in range(6)]
        + [Message(f"block{i}", b"x") for i in range(2)]
        + [Message(f"h{i}", b"x") for i in range(6, 10)]
    )

    def settle(mid: str) -> None:
        with lock:
            d, done = held[mid]
        consumer.ack(d)
        done()

    try:
        # h0-h5 held (settling), both handlers blocked: 8 held, nothing free
        wait_for(lambda: len(held) == 6 and sub.in_flight == 8, 10, what="6 held, 2 blocked")
        assert consumer.sizes == [8]
        settle("h0")  # one free: not worth a fetch while both handlers are busy
        deadline = time.monotonic() + 0.5  # five polls of the fetch loop
        while time.monotonic() < deadline:
            assert (sub.in_flight, consumer.sizes) == (7, [8])
            threading.Event().wait(0.01)
        settle("h1")  # a quarter free: one fetch of two (waiting for a handler)
        wait_for(lambda: len(consumer.sizes) == 2, 10, what="a second fetch")
        assert consumer.sizes == [8, 2] and sub.in_flight == 8
    finally:
        gate.set()  # the handlers go on to h6 and h7, then h8 and h9
        with contextlib.suppress(AssertionError):  # (not to hide a failure above)
            wait_for(lambda: len(held) == 10, 10, what="h2-h9 held")
        for mid in list(held)[2:]:
            settle(mid)  # (h0 and h1 are settled above)
        sub.stop(5)
        conn.close()
