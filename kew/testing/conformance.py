"""The provider conformance kit: the SPI's contract (ARCHITECTURE.md, and
the docstrings of :mod:`kew.qchan.spi`) as pytest tests.

Any provider, kew's own or a third party's, runs it against its real broker::

    from kew.testing.conformance import ProviderConformance

    class TestMyBroker(ProviderConformance):
        @pytest.fixture
        def url(self) -> str:
            return "mybroker://127.0.0.1:1234/?lease=2"

The URL should make crash recovery quick (a short lease, for providers that
use one).  Every test gets fresh queue names and deletes them afterwards.
A test that needs a :class:`~kew.qchan.spi.Capability` the connector
``lacks`` is skipped with the provider's reason, never silently.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TypedDict

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kew
from kew.core.msg import ChannelMessage, CountedSchedule, FutureTimepoint, RepeatAction, Schedule
from kew.qchan.spi import (
    Capability,
    Connector,
    Message,
    MessageTooLarge,
    now_ms,
)
from kew.testing._settle_kit import SettleConformance, _fetch_n, _receive
from kew.testing.util import wait_for

# -- types the kit round-trips ----------------------------------------------


def _divide_by_zero(value: object) -> None:
    """A sink handler that fails (ZeroDivisionError) for every message."""
    1 / 0  # noqa: B018


class Point(msgspec.Struct, frozen=True):
    x: int
    y: float
    label: str = ""


class Job(msgspec.Struct, frozen=True):
    id: int
    name: str
    tags: list[str]
    points: list[Point]
    extra: dict[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    email: str
    port: int
    dataset_id: int | None


class Event(TypedDict):
    kind: str
    at: int


# JSON-safe text and numbers (msgspec's JSON round-trips any str and finite float).
_text = st.text(max_size=40)
_int = st.integers(min_value=-(2**53), max_value=2**53)
_float = st.floats(allow_nan=False, allow_infinity=False, width=64)
_point = st.builds(Point, x=_int, y=_float, label=_text)
_job = st.builds(
    Job,
    id=_int,
    name=_text,
    tags=st.lists(_text, max_size=4),
    points=st.lists(_point, max_size=3),
    extra=st.none() | st.dictionaries(_text, _int, max_size=3),
)
_request = st.builds(Request, email=_text, port=_int, dataset_id=st.none() | _int)
_event = st.fixed_dictionaries({"kind": _text, "at": _int})

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _collect(q: kew.Queue[Any], n: int, timeout: float = 20.0, **kw: Any) -> list[Any]:
    got: list[Any] = []
    lock = threading.Lock()

    def add(x: Any) -> None:
        with lock:
            got.append(x)

    with q.sink(add, **kw):
        wait_for(lambda: len(got) >= n, timeout, what=f"{n} messages on {q.name}")
    return got


def _check_round_trip(q: kew.Queue[Any], strategy: st.SearchStrategy[Any]) -> None:
    @SETTINGS
    @given(strategy)
    def check(value: Any) -> None:
        q.send(value)
        assert q.codec.decode(_receive(q.connector, q.name).message.body) == value

    check()


class ProviderConformance(SettleConformance):
    """Subclass this with a ``url`` fixture to check a provider.  (The
    settling tests, and ``need`` and ``crash_redelivery_timeout``, come from
    :class:`kew.testing._settle_kit.SettleConformance`.)"""

    #: How late a delayed message may be on an idle broker, in seconds.
    max_delay_lateness: float = 1.0

    # -- fixtures ----------------------------------------------------------

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("a conformance test class must define a `url` fixture")

    @pytest.fixture
    def connector(self, url: str) -> Iterator[Connector]:
        c = kew.connect(url)
        yield c
        c.close()

    @pytest.fixture
    def queue_name(self, url: str, request: pytest.FixtureRequest) -> Iterator[str]:
        name = f"kit-{request.node.name[:40].strip('_')}-{os.urandom(4).hex()}".replace("[", "-")
        name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
        yield name
        c = kew.connect(url)
        try:
            c.delete(name)
        finally:
            c.close()

    # -- typed round trips ---------------------------------------------------

    @pytest.mark.parametrize("codec", ["json", "msgpack"])
    def test_round_trip_structs(self, connector: Connector, queue_name: str, codec: str) -> None:
        _check_round_trip(kew.Queue(connector, queue_name, Job, codec=codec), _job)

    def test_round_trip_dataclass_typeddict_builtins(
        self, connector: Connector, queue_name: str
    ) -> None:
        cases: list[tuple[Any, Any]] = [
            (Request, _request),
            (Event, _event),
            (int, _int),
            (str, st.text()),
            (list[float], st.lists(_float, max_size=5)),
            (dict[str, list[int]], st.dictionaries(_text, st.lists(_int, max_size=3), max_size=3)),
            (tuple[int, str, bool], st.tuples(_int, _text, st.booleans())),
        ]
        for i, (tp, strategy) in enumerate(cases):
            name = f"{queue_name}-{i}"
            try:
                _check_round_trip(kew.Queue(connector, name, tp), strategy)
            finally:
                connector.delete(name)

    def test_headers_and_id_round_trip(self, connector: Connector, queue_name: str) -> None:
        connector.declare(queue_name)
        headers: dict[str, str | int] = {"a": "text", "b": 42, "c": -(2**40), "d": ""}
        connector.producer(queue_name).send(Message("id-1", b"\x00\xffbinary", headers))
        got = _receive(connector, queue_name)
        assert got.message.id == "id-1"
        assert got.message.body == b"\x00\xffbinary"
        assert {k: got.message.headers.get(k) for k in headers} == headers
        assert got.delivery_count == 1

    # -- ordering, durability, acks ---------------------------------------------

    def test_fifo_one_producer_one_consumer(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, int)
        for i in range(50):
            q.send(i)
        q.send_many(range(50, 100))
        assert _collect(q, 100) == list(range(100))

    def test_durable_across_reconnect(self, url: str, queue_name: str) -> None:
        c = kew.connect(url)
        self.need(c, Capability.DURABLE)
        kew.Queue(c, queue_name, str).send_many(["a", "b", "c"])
        c.close()
        c2 = kew.connect(url)
        try:
            assert _collect(kew.Queue(c2, queue_name, str), 3) == ["a", "b", "c"]
        finally:
            c2.close()

    def test_send_many_is_durable_as_a_whole(self, url: str, queue_name: str) -> None:
        c = kew.connect(url)
        self.need(c, Capability.DURABLE)
        kew.Queue(c, queue_name, int).send_many(range(500))
        c.close()
        c2 = kew.connect(url)
        try:
            q = kew.Queue(c2, queue_name, int)
            assert sorted(_collect(q, 500, concurrency=4)) == list(range(500))
        finally:
            c2.close()

    def test_settling_twice_is_a_no_op(self, connector: Connector, queue_name: str) -> None:
        """A delivery is settled once; a second ack, a dead letter after an
        ack, or a release after one, does nothing and raises nothing (one
        answer on every provider), and settles no other delivery."""
        connector.declare(queue_name)
        producer = connector.producer(queue_name)
        producer.send_many([Message("first", b"1"), Message("second", b"2")])
        consumer = connector.consumer(queue_name, 1)
        try:
            (first,) = _fetch_n(consumer, 1)
            consumer.ack(first)
            consumer.ack(first)
            consumer.dead_letter(first, "settled already")
            consumer.release(first)
            (second,) = _fetch_n(consumer, 1)
            assert second.message.id == "second"
            consumer.ack(second)
        finally:
            consumer.close()
        browser = connector.browser(queue_name)
        try:
            assert browser.dead_letters(10) == []
        finally:
            browser.close()
        again = connector.consumer(queue_name, 2)
        try:
            assert again.fetch(2, 0.5) == []
        finally:
            again.close()

    def test_ack_only_after_consumer_returns(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, str)
        q.send("slow")
        entered, release = threading.Event(), threading.Event()

        def blocked(_: str) -> None:
            entered.set()
            release.wait(30)

        sub = q.sink(blocked)
        try:
            assert entered.wait(10), "the consumer never got the message"
            # The handler has not returned: stopping hands the message back.
            assert sub.stop(grace=0.2) is False
        finally:
            release.set()
        again = _collect(q, 1)
        assert again == ["slow"]

    def test_release_hands_back(self, connector: Connector, queue_name: str) -> None:
        connector.declare(queue_name)
        connector.producer(queue_name).send(Message("r1", b"1"))
        consumer = connector.consumer(queue_name, 1)
        try:
            first = wait_for(lambda: consumer.fetch(1, 0.5), 10, what="first delivery")[0]
            consumer.release(first)
            second = wait_for(lambda: consumer.fetch(1, 0.5), 10, what="redelivery")[0]
            assert second.message.id == "r1"
            consumer.ack(second)
        finally:
            consumer.close()

    def test_crash_redelivery(self, url: str, connector: Connector, queue_name: str) -> None:
        """A consumer process killed with SIGKILL while holding a message:
        another consumer gets it."""
        self.need(connector, Capability.MULTIPROCESS)
        q = kew.Queue(connector, queue_name, str)
        q.send("precious")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kew.testing._hold", url, queue_name],
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
        delivery = _receive(connector, queue_name, timeout=self.crash_redelivery_timeout)
        assert q.codec.decode(delivery.message.body) == "precious"
        assert delivery.delivery_count >= 2

    # -- delays, schedules, repeats ---------------------------------------------

    def test_delayed_delivery_never_early(self, connector: Connector, queue_name: str) -> None:
        self.need(connector, Capability.DELAYED_DELIVERY)
        q = kew.Queue(connector, queue_name, int)
        received: dict[int, int] = {}
        due: dict[int, int] = {}
        with q.sink(lambda i: received.__setitem__(i, now_ms()), concurrency=2):
            for i, delay in enumerate((1.5, 0.5, 1.0)):
                when = FutureTimepoint.after(delay)
                due[i] = when.epoch_ms
                q.send_at(when, i)
            q.send(99)
            wait_for(lambda: len(received) == 4, 15, what="4 messages")
        for i in range(3):
            assert received[i] >= due[i], f"message {i} came {due[i] - received[i]} ms early"
            late = (received[i] - due[i]) / 1000
            assert late <= self.max_delay_lateness, f"message {i} came {late:.3f}s late"
        assert received[99] <= min(received[i] for i in range(3))

    def test_counted_schedule_round_trip(self, connector: Connector, queue_name: str) -> None:
        self.need(connector, Capability.DELAYED_DELIVERY)
        q = kew.Queue(connector, queue_name, str)
        seen: list[tuple[int, int, str]] = []

        class Twice:
            def consume(self, current: CountedSchedule, data: str) -> Schedule[str] | None:
                seen.append((current.count, current.when.epoch_ms, data))
                if current.count < 3:
                    return Schedule(FutureTimepoint.after(0.2), data + "!")
                return None

        q.send("go")
        with q.reschedulable_sink(Twice()):
            wait_for(lambda: len(seen) == 3, 15, what="3 deliveries")
        assert [(c, d) for c, _, d in seen] == [(1, "go"), (2, "go!"), (3, "go!!")]
        assert seen[1][1] >= seen[0][1] + 200 and seen[2][1] >= seen[1][1] + 200

    def test_message_sink_sees_metadata(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, str)
        got: list[ChannelMessage[CountedSchedule, str]] = []
        before = now_ms()
        q.send("m")
        with q.message_sink(got.append):
            wait_for(lambda: got, 10, what="a message")
        assert got[0].data == "m" and got[0].metadata is not None
        assert got[0].metadata.count == 1 and got[0].metadata.when.epoch_ms >= before

    def test_repeater_intervals_and_exceeded_once(
        self, connector: Connector, queue_name: str
    ) -> None:
        self.need(connector, Capability.DELAYED_DELIVERY)
        q = kew.Queue(connector, queue_name, str)
        attempts: list[int] = []
        exceeded: list[str] = []
        intervals = [0.2, 0.4]

        def flaky(_: str) -> RepeatAction:
            attempts.append(now_ms())
            if len(attempts) == 2:
                raise RuntimeError("an exception counts as REPEAT")
            return RepeatAction.REPEAT

        q.send("task")
        with q.repeat_sink(flaky, intervals, exceeded.append):
            wait_for(lambda: exceeded, 15, what="the exceeded handler")
            # no further attempt after the exceeded handler
            time.sleep(0.5)
        assert exceeded == ["task"]
        assert len(attempts) == 3
        for i, d in enumerate(intervals):
            assert attempts[i + 1] - attempts[i] >= d * 1000

    def test_repeater_stop_ends_it(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, str)
        calls: list[str] = []
        q.send("once")

        def once(s: str) -> RepeatAction:
            calls.append(s)
            return RepeatAction.STOP

        with q.repeat_sink(once, [0.1], calls.append):
            wait_for(lambda: calls, 10, what="the first attempt")
            browser = q.browser()
            wait_for(lambda: browser.stats().in_flight in (0, -1), 5, what="the ack")
        assert calls == ["once"]
        assert browser.stats().ready in (0, -1)

    # -- competing consumers and back-pressure ----------------------------------

    def test_competing_consumers_get_distinct_messages(
        self, url: str, connector: Connector, queue_name: str
    ) -> None:
        other = kew.connect(url)
        try:
            q1 = kew.Queue(connector, queue_name, int)
            q2 = kew.Queue(other, queue_name, int)
            a: list[int] = []
            b: list[int] = []
            q1.send_many(range(200))
            with q1.sink(a.append, prefetch=5), q2.sink(b.append, prefetch=5):
                wait_for(lambda: len(a) + len(b) >= 200, 30, what="200 messages")
            assert sorted(a + b) == list(range(200))
            assert not set(a) & set(b)
        finally:
            other.close()

    def test_prefetch_bound(self, connector: Connector, queue_name: str) -> None:
        connector.declare(queue_name)
        connector.producer(queue_name).send_many([Message(str(i), b"x") for i in range(10)])
        consumer = connector.consumer(queue_name, 3)
        try:
            held = list(wait_for(lambda: consumer.fetch(10, 0.5), 10, what="deliveries"))
            deadline = time.monotonic() + 3
            while len(held) < 3 and time.monotonic() < deadline:
                held += consumer.fetch(10, 0.2)
            assert len(held) == 3
            assert consumer.fetch(10, 0.3) == [] or False, "fetched past the prefetch bound"
            consumer.ack(held.pop())
            more = wait_for(lambda: consumer.fetch(10, 0.5), 10, what="one more")
            assert len(more) == 1
            for d in [*held, *more]:
                consumer.ack(d)
        finally:
            consumer.close()

    def test_concurrency_bound_in_sink(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, int)
        q.send_many(range(30))
        lock = threading.Lock()
        now = [0]
        peak = [0]
        done: list[int] = []

        def work(i: int) -> None:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.01)
            with lock:
                now[0] -= 1
                done.append(i)

        with q.sink(work, concurrency=3):
            wait_for(lambda: len(done) == 30, 20, what="30 messages")
        assert 1 <= peak[0] <= 3

    # -- bad input and dead letters ------------------------------------------------

    def test_poison_body_goes_to_dead_letters(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, Point)
        q.declare()  # a Queue declares on first use; the raw sends below come first
        connector.producer(queue_name).send(Message("bad-1", b'{"x": "not a number"}'))
        connector.producer(queue_name).send(Message("bad-2", b"\xff\x00 not json"))
        q.send(Point(1, 2.0))
        assert _collect(q, 1) == [Point(1, 2.0)]
        wait_for(lambda: len(q.dead.list()) == 2, 10, what="2 dead letters")
        dead = q.dead.list()
        reasons = {d.id: d.reason for d in dead}
        assert "Expected `int`, got `str`" in reasons["bad-1"] and "$.x" in reasons["bad-1"]
        assert "cannot decode" in reasons["bad-2"]

    def test_exception_goes_to_dead_letters_without_loop(
        self, connector: Connector, queue_name: str
    ) -> None:
        q = kew.Queue(connector, queue_name, str)
        calls: list[str] = []

        def fail(s: str) -> None:
            calls.append(s)
            raise ValueError(f"cannot handle {s}")

        q.send("x")
        with q.sink(fail):
            dead = wait_for(lambda: q.dead.list(), 10, what="a dead letter")
            q.send("y")
            wait_for(lambda: len(calls) >= 2, 10, what="the next message")
        assert calls == ["x", "y"]
        assert "ValueError: cannot handle x" in dead[0].reason
        assert dead[0].body == b'"x"' and dead[0].dead_at > 0

    def test_dead_letters_list_requeue_purge(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, int)
        with q.sink(_divide_by_zero):
            q.send_many(range(4))
            wait_for(lambda: len(q.dead.list()) == 4, 10, what="4 dead letters")
        dead = q.dead.list()
        assert all("ZeroDivisionError" in d.reason for d in dead)
        assert q.browser().stats().dead in (4, -1)
        assert q.dead.requeue([dead[0].id]) == 1
        assert _collect(q, 1) == [0]
        assert len(q.dead.list()) == 3
        assert q.dead.purge([dead[1].id]) == 1
        assert sorted(int(d.body) for d in q.dead.list()) == [2, 3]
        assert q.dead.requeue() == 2
        assert sorted(_collect(q, 2)) == [2, 3]
        with q.sink(_divide_by_zero):
            q.send(7)
            wait_for(lambda: q.dead.list(), 10, what="a dead letter")
        assert q.dead.purge() == 1
        assert q.dead.list() == []

    def test_browse_does_not_remove(self, connector: Connector, queue_name: str) -> None:
        self.need(connector, Capability.BROWSE)
        q = kew.Queue(connector, queue_name, int)
        q.send_many([1, 2, 3])
        b = q.browser()
        assert wait_for(lambda: b.peek(10) == [1, 2, 3] or None, 10, what="peek") is True
        assert b.peek(2) == [1, 2]
        assert _collect(q, 3) == [1, 2, 3]

    def test_stats_ready_count(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, int)
        q.send_many(range(5))
        wait_for(lambda: q.browser().stats().ready == 5, 10, what="ready=5")
        stats = q.browser().stats()
        assert stats.in_flight in (0, -1)

    # -- concurrency and limits ------------------------------------------------

    def test_concurrent_sends_from_threads(self, connector: Connector, queue_name: str) -> None:
        q = kew.Queue(connector, queue_name, int)
        errors: list[BaseException] = []

        def send(base: int) -> None:
            try:
                for i in range(50):
                    q.send(base + i)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=send, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        got = _collect(q, 200, concurrency=4)
        assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(50))

    def test_oversize_message_refused_at_send(self, connector: Connector, queue_name: str) -> None:
        limit = connector.max_message_size
        q = kew.Queue(connector, queue_name, bytes)
        with pytest.raises(MessageTooLarge, match=f"maximum of {limit} bytes"):
            q.send(b"x" * limit)  # base64 in JSON: larger than the limit
        producer = connector.producer(queue_name)
        with pytest.raises(MessageTooLarge):
            producer.send(Message("big", b"x" * (limit + 1)))
        q.send(b"small")
        assert _collect(q, 1) == [b"small"]

    def test_credentials_not_in_repr(self, connector: Connector) -> None:
        text = f"{connector!r} {connector.url}"
        assert "://" in connector.url
        for secret in ("guest:guest@", ":password@", ":secret@"):
            assert secret not in text
