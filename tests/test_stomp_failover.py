"""kew_artemis on a pair of ActiveMQ Classic brokers in shared-store
master/slave (tests/brokers/activemq_pair.py): the client's URL lists both
hosts, ``stomp://127.0.0.1:p0,127.0.0.1:p1/``, and kew's failover list
finds the one that answers (the slave's port is closed until it takes the
store's lock).

The conformance kit runs with the master on the URL's second host (the
first refuses); the master is SIGKILLed twice under a producer of receipted
sends and a consumer (no receipted send lost, duplicates counted, the
failover timed); what the new master has (held deliveries again, acked ones
not, delayed ones when due, the delivery count); a black-holed first host
costs connect_timeout once; the chaos driver runs with failovers for its
broker restarts.  The figures are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.qchan.spi import Message, now_ms
from kew.testing.conformance import ProviderConformance
from kew.testing.util import require, wait_for
from kew_artemis.provider import StompConsumer
from tests.brokers.activemq_pair import ActiveMQPair
from tests.chaos.driver import run_chaos


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQPair]:
    require(ActiveMQPair.available(), "ActiveMQ (Debian package activemq) is not installed")
    p = ActiveMQPair(tmp_path_factory.mktemp("activemq-pair"))
    try:
        p.start()
        print(f"\nActiveMQ pair (shared KahaDB) up in {p.up_s:.1f} s: master 0, slave 1")
        yield p
    finally:
        p.stop()
        if p.takeovers:
            print(
                f"\nActiveMQ pair: {len(p.takeovers)} takeover(s), kill to the slave's port "
                f"open: {', '.join(f'{t:.2f}' for t in p.takeovers)} s; a killed broker "
                f"back as slave in {', '.join(f'{t:.1f}' for t in p.rejoins)} s"
            )


@pytest.fixture(autouse=True)
def _healed(pair: ActiveMQPair) -> Iterator[None]:
    """Each test starts with a master and a slave, whatever the last one left."""
    pair.heal()
    yield


# -- the kit ---------------------------------------------------------------------


class TestActiveMQPairConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self, pair: ActiveMQPair) -> str:
        if pair.which() != 1:  # the master on the second host: the first one refuses
            pair.fail_over()
        assert pair.which() == 1 and pair.is_slave(0)
        return pair.url + "&max_message_size=1048576"


# -- the master killed mid-traffic ---------------------------------------------


def _failover_run(pair: ActiveMQPair, n: int = 2400, kills: int = 2) -> dict[str, Any]:
    """Receipted sends of ``n`` ints (single sends and batches of 10, in a
    transaction: ActiveMQ's ``batch=tx``) while a consumer runs; the master
    is SIGKILLed ``kills`` times, evenly spread, each time once the
    consumer took messages since the last; the slave takes over and the
    killed broker comes back as the new slave."""
    c = kew.connect(pair.url)
    queue = f"failover-{os.urandom(4).hex()}"
    q = kew.Queue(c, queue, int)
    consumed: Counter[int] = Counter()
    events: list[tuple[float, int]] = []  # (when, what) of every consumption
    confirmed: dict[int, float] = {}
    failed_sends: list[str] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        with lock:
            consumed[i] += 1
            events.append((time.monotonic(), i))

    def produce() -> None:
        i = 0
        while i < n:
            batch = [i] if i % 20 else list(range(i, min(i + 10, n)))
            try:
                if len(batch) == 1:
                    q.send(i)
                else:
                    q.send_many(batch)
            except kew.KewError as e:  # maybe stored: sent again (a duplicate, never a loss)
                failed_sends.append(f"{type(e).__name__}: {e}")
                continue
            at = time.monotonic()
            with lock:
                confirmed.update((b, at) for b in batch)
            i += len(batch)
            time.sleep(0.002)  # spread the sends over the kills

    kill_times: list[float] = []
    killed: list[int] = []
    producer = threading.Thread(target=produce, daemon=True)
    with q.sink(take, concurrency=2) as sub:
        producer.start()
        for k in range(1, kills + 1):
            sent, seen = n * k // (kills + 1), len(consumed)
            wait_for(lambda: len(confirmed) >= sent, 90, what="sends before a kill")  # noqa: B023
            wait_for(lambda: len(consumed) > seen, 60, what="consumption since the last kill")  # noqa: B023
            i, at = pair.kill_master()
            killed.append(i)
            kill_times.append(at)
            pair.take_over(i, at)
            pair.rejoin(i)
        producer.join(120)
        assert not producer.is_alive(), "the producer never finished"

        def all_in() -> bool:
            with lock:
                return set(confirmed) <= set(consumed)

        wait_for(all_in, 60, what="every receipted send consumed")
        wait_for(lambda: sub.in_flight == 0, 20, what="nothing in flight")
        alive = sub.alive
        reconnects = getattr(sub._consumer, "reconnects", None)
    c.delete(queue)
    c.close()
    with lock:
        first: list[float | None] = []
        first_new: list[float | None] = []
        for at in kill_times:
            after = [t for t, _ in events if t > at]
            new = [t for t, m in events if t > at and confirmed.get(m, 0.0) > at]
            first.append(min(after) - at if after else None)
            first_new.append(min(new) - at if new else None)
        return {
            "killed": killed,
            "takeovers": pair.takeovers[-kills:],
            "first_consumed_s": first,
            "first_new_consumed_s": first_new,
            "confirmed": len(confirmed),
            "lost": len(set(confirmed) - set(consumed)),
            "duplicates": sum(k - 1 for k in consumed.values()),
            "failed_sends": failed_sends,
            "reconnects": reconnects,
            "alive": alive,
        }


def test_master_killed_mid_traffic_loses_no_receipted_send(pair: ActiveMQPair) -> None:
    """Producers and consumers move over: no receipted send lost, no send
    raised (the one in flight at the kill is sent again to the new master,
    maybe a duplicate), the consumer resubscribed there each time."""
    started = time.monotonic()
    r = _failover_run(pair)

    def s(values: list[float | None]) -> str:
        return ", ".join("never" if v is None else f"{v:.2f}" for v in values) + " s"

    print(
        f"\nSTOMP pair failover: masters {r['killed']} SIGKILLed mid-run; slave's port open "
        f"after {s(r['takeovers'])}; first message consumed after each kill: "
        f"{s(r['first_consumed_s'])}; first one sent after each kill consumed: "
        f"{s(r['first_new_consumed_s'])}; receipted {r['confirmed']}, lost {r['lost']}, "
        f"duplicates {r['duplicates']}, sends that raised {len(r['failed_sends'])}, consumer "
        f"reconnects {r['reconnects']}; in {time.monotonic() - started:.1f} s"
    )
    assert r["lost"] == 0
    assert r["failed_sends"] == [], r["failed_sends"][:3]
    assert r["alive"] and r["reconnects"] == len(r["killed"])
    assert None not in r["first_new_consumed_s"]
    assert r["killed"][0] != r["killed"][1]  # the rejoined slave took over the second time


# -- what the new master has ---------------------------------------------------------


@pytest.mark.parametrize(
    "persist_redelivered", [False, True], ids=["default", "persistJMSRedelivered"]
)
def test_the_new_master_has_the_store(
    pair: ActiveMQPair, tmp_path: Path, persist_redelivered: bool
) -> None:
    """After a failover the new master holds what the store held: a
    delivery a consumer held unsettled comes again (to the same consumer,
    on its new connection) and an acked one does not; a delayed message
    (ActiveMQ's scheduler store is in the shared directory too) comes when
    due, not early.  The held one's delivery count stays 1 unless the
    queues' policy has persistJMSRedelivered (a pair of its own here)."""
    own = ActiveMQPair(tmp_path, persist_redelivered=True) if persist_redelivered else None
    p = own or pair
    killed: int | None = None
    try:
        if own is not None:
            own.start()
        c = kew.connect(p.url)
        queue = f"store-{os.urandom(3).hex()}"
        producer = c.producer(queue)
        consumer = c.consumer(queue, 1)
        browser = c.browser(queue)
        producer.send(Message("acked", b"1", {}))
        first = wait_for(lambda: consumer.fetch(1, 0.5), 30, what="the first message")[0]
        consumer.ack(first)
        producer.send(Message("held", b"2", {}))
        held = wait_for(lambda: consumer.fetch(1, 0.5), 30, what="the held message")[0]
        # the ack stored, as far as the broker tells: only "held" is in the queue
        wait_for(lambda: [m.id for m in browser.peek(10)] == ["held"], 30, what="the ack")
        due = now_ms() + 2500
        producer.send(Message("delayed", b"3", {}, deliver_at=due))
        killed, at = p.kill_master()
        scheduled_at_kill = now_ms() < due
        p.take_over(killed, at)
        again = wait_for(lambda: consumer.fetch(1, 0.5), 60, what="the held one again")[0]
        consumer.ack(held)  # its connection is gone: a no-op
        consumer.ack(again)
        late = wait_for(lambda: consumer.fetch(1, 0.5), 60, what="the delayed one")[0]
        arrived = now_ms()
        consumer.ack(late)
        rest = consumer.fetch(1, 1.0)
        consumer.close()
        c.delete(queue)
        c.close()
    finally:
        if own is not None:
            own.stop()
        elif killed is not None and not pair.alive(killed):
            pair.rejoin(killed)
    assert (first.message.id, held.message.id) == ("acked", "held")
    assert again.message.id == "held" and again.message.body == b"2"
    assert again.delivery_count == (2 if persist_redelivered else 1)
    assert scheduled_at_kill and late.message.id == "delayed" and arrived >= due
    assert rest == []  # "acked" did not come back
    assert isinstance(consumer, StompConsumer) and consumer.reconnects == 1


# -- the failover list ------------------------------------------------------------


@contextlib.contextmanager
def _black_hole() -> Iterator[int]:
    """A loopback port whose SYNs are dropped, like a host that is off: a
    listener with a backlog of 0, filled by one connection never accepted."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        filler.connect(("127.0.0.1", port))
        yield port


def test_new_connections_start_at_the_host_that_answered_last(pair: ActiveMQPair) -> None:
    """The URL's first host is gone without a word: the first connection
    waits connect_timeout for it (once: no probe waits again), then
    connects to the second; every connection after that, of any connector
    in the process, starts at the second and is made at once."""
    with _black_hole() as dead:
        master = pair.master
        url = (
            f"stomp://127.0.0.1:{dead},127.0.0.1:{master.port}/"
            "?dialect=activemq&connect_timeout=1&retries=0"
        )
        first = kew.connect(url)
        second = kew.connect(url)
        try:
            took = kew.ping(first)
            again = kew.ping(second)
        finally:
            first.close()
            second.close()
    print(
        f"\nfailover list, first host black-holed: connecting took {took:.2f} s, then {again:.3f} s"
    )
    assert 1.0 <= took < 2.0  # one connect_timeout; a probe of the dead host would make it 2
    assert again < 0.9  # less than a connect_timeout: the dead host was not tried first


# -- chaos -----------------------------------------------------------------------


@pytest.mark.slow
def test_chaos_on_the_pair(pair: ActiveMQPair, tmp_path: Path) -> None:
    """tests/chaos/driver.py on the pair: worker processes SIGKILLed,
    client connections to the master cut, and each "broker restart" a
    failover (master SIGKILLed, the slave takes over, the killed one comes
    back as the slave); no accepted task lost."""
    tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
    s = run_chaos(pair, tmp_path, tasks=tasks)
    print("\n" + s.line())
    assert s.restarts == 2 and not s.notes, s.notes
    assert s.lost == 0
    assert s.duplicates < s.allowed_duplicates
