"""The settling part of the conformance kit: an outbox settle, the group
settle of concurrent handlers, and grouped acks across a crash.  A mixin of
:class:`kew.testing.conformance.ProviderConformance` (which has the
fixtures it uses: ``url``, ``connector``, ``queue_name``)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import kew
from kew.qchan.runtime import GroupSettle, Subscription
from kew.qchan.spi import (
    Capability,
    Connector,
    Delivery,
    Message,
    MessageTooLarge,
    OutboxConsumer,
    now_ms,
)
from kew.testing._crash_check import check_mid_group_crash
from kew.testing.util import wait_for


def _receive(connector: Connector, queue: str, timeout: float = 10.0) -> Delivery:
    """Fetch and ack one delivery through the SPI."""
    consumer = connector.consumer(queue, 1)
    try:
        got = wait_for(lambda: consumer.fetch(1, 0.5), timeout, what=f"a message on {queue}")
        consumer.ack(got[0])
        return got[0]
    finally:
        consumer.close()


def _fetch_n(consumer: Any, n: int, timeout: float = 10.0) -> list[Delivery]:
    """Fetch until ``n`` deliveries are held (not settled)."""
    got: list[Delivery] = []

    def more() -> bool:
        got.extend(consumer.fetch(n - len(got), 0.5))
        return len(got) >= n

    wait_for(more, timeout, what=f"{n} deliveries")
    return got


class SettleConformance:
    """The settling tests of :class:`~kew.testing.conformance.ProviderConformance`."""

    #: Seconds the kit waits for a killed consumer's message to come back.
    crash_redelivery_timeout: float = 60.0

    def need(self, connector: Connector, capability: Capability) -> None:
        """Skip the test, with the provider's reason, if ``connector`` lacks
        ``capability``."""
        reason = connector.lacks.get(capability)
        if reason is not None:
            pytest.skip(f"{connector.url} lacks {capability.value}: {reason}")

    # -- settling with an outbox (optional OutboxConsumer.settle; GroupSettle) ---

    @pytest.fixture
    def outbox_name(self, url: str, queue_name: str) -> Iterator[str]:
        name = queue_name + ".out"
        yield name
        c = kew.connect(url)
        try:
            c.delete(name)
        finally:
            c.close()

    def _settled(self, connector: Connector, queue: str, ready: int) -> None:
        """Wait until ``queue`` holds ``ready`` messages and none in flight
        (counts the provider cannot tell are not checked)."""
        browser = connector.browser(queue)
        try:

            def ok() -> bool:
                s = browser.stats()
                return s.ready in (-1, ready) and s.in_flight in (-1, 0)

            wait_for(ok, 10, what=f"{queue}: {ready} ready, none in flight")
        finally:
            browser.close()

    def test_outbox_settle_sends_then_acks(
        self, connector: Connector, queue_name: str, outbox_name: str
    ) -> None:
        connector.declare(queue_name)
        connector.declare(outbox_name)
        connector.producer(queue_name).send_many([Message(f"in{i}", b"%d" % i) for i in range(3)])
        consumer = connector.consumer(queue_name, 3)
        if not isinstance(consumer, OutboxConsumer):
            consumer.close()
            pytest.skip(f"{connector.url}: consumers have no settle() (optional)")
        try:
            held = _fetch_n(consumer, 3)
            # A message too large for the broker: refused, nothing acked.
            limit = connector.max_message_size
            with pytest.raises(MessageTooLarge):
                consumer.settle(held[:1], [(outbox_name, Message("big", b"x" * (limit + 1)))])
            sends = [
                (outbox_name, Message("out1", b"one", {"k": "v", "n": 2})),
                (outbox_name, Message("out2", b"two")),
                (queue_name, Message("again", b"back", deliver_at=now_ms() + 300)),
            ]
            consumer.settle(held[:2], sends)
            consumer.settle(held[:1], [])  # settled already: skipped, no error
            got = [_receive(connector, outbox_name), _receive(connector, outbox_name)]
            assert [(d.message.id, d.message.body) for d in got] == [
                ("out1", b"one"),
                ("out2", b"two"),
            ]
            assert got[0].message.headers == {"k": "v", "n": 2}
            # The third delivery is still held: released, it comes back
            # (and so does the delayed message sent to the consumer's queue).
            consumer.release(held[2])
            back = _fetch_n(consumer, 2)
            assert sorted(d.message.id for d in back) == ["again", "in2"]
            consumer.settle(back, [])
        finally:
            consumer.close()
        self._settled(connector, queue_name, 0)

    def test_group_settle_from_concurrent_handlers(
        self, connector: Connector, queue_name: str, outbox_name: str
    ) -> None:
        """Handlers settling at once (GroupSettle: the consumer's settle, or
        send_many then ack for a consumer without one): every outgoing
        message stored, every delivery acked, none twice."""
        connector.declare(queue_name)
        connector.declare(outbox_name)
        n = 60
        connector.producer(queue_name).send_many([Message(f"t{i}", b"%d" % i) for i in range(n)])
        consumer = connector.consumer(queue_name, 8)
        out = connector.producer(outbox_name)
        settler = GroupSettle(consumer, lambda q, ms: out.send_many(ms))
        handled: list[str] = []
        lock = threading.Lock()

        def handle(_: Any, d: Delivery) -> None:
            msg = Message("o-" + d.message.id, d.message.body)
            settler.settle((d,), [(outbox_name, msg)])
            with lock:
                handled.append(d.message.id)

        sub = Subscription(consumer, handle, name=queue_name, concurrency=8)
        try:
            wait_for(lambda: len(handled) >= n, 30, what=f"{n} settled")
        finally:
            sub.stop(grace=5)
        assert sorted(handled) == sorted(f"t{i}" for i in range(n))
        self._settled(connector, queue_name, 0)
        reader = connector.consumer(outbox_name, n)
        try:
            got = _fetch_n(reader, n, 20)
            for d in got:
                reader.ack(d)
        finally:
            reader.close()
        assert sorted(d.message.id for d in got) == sorted(f"o-t{i}" for i in range(n))

    def test_grouped_acks_crash_redelivers_every_unacked(
        self, url: str, connector: Connector, queue_name: str
    ) -> None:
        """A consumer process killed with SIGKILL mid-group (kew.testing._mid_group:
        one group of acks committed, the next under way, more handed over,
        one handler running, more fetched): every delivery whose ack was
        not committed comes back, and no ack was committed before its
        handler returned."""
        self.need(connector, Capability.MULTIPROCESS)
        connector.declare(queue_name)
        check_mid_group_crash(
            connector,
            queue_name,
            [sys.executable, "-m", "kew.testing._mid_group", url, queue_name],
            timeout=self.crash_redelivery_timeout,
            acked_stays=False,  # (any provider: an ack may be a one-way frame)
        )
