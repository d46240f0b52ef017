"""The providers' shared kit (kew.qchan.spi.kit), on its own."""

from __future__ import annotations

import threading

from kew.qchan.spi import Delivery, Message
from kew.qchan.spi.kit import Backoff, DeliveryBuffer, HeldLeases, ttl_delay_route
from kew.testing.util import wait_for


def test_backoff_doubles_with_jitter_up_to_most() -> None:
    b = Backoff(first=0.1, most=0.4)
    delays = [b.delay() for _ in range(5)]
    bases = [0.1, 0.2, 0.4, 0.4, 0.4]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    assert len({round(Backoff(1, 1).delay(), 6) for _ in range(20)}) > 1  # jittered
    b.reset()
    assert b.delay() <= 0.1


def test_buffer_hands_out_only_the_current_generation() -> None:
    buf = DeliveryBuffer()
    d = [Delivery(Message(str(i), b""), 1, i) for i in range(4)]
    buf.put(1, d[0])
    buf.put(2, d[1])
    buf.put(2, d[2])
    assert buf.take(10, 0.1, lambda: 2) == [d[1], d[2]]
    assert buf.take(10, 0.05, lambda: 2) == []
    buf.put(2, d[3])
    buf.drop()
    assert buf.take(10, 0.05, lambda: 2) == []
    woke = threading.Timer(0.05, buf.wake)
    woke.start()
    assert buf.take(1, 5, lambda: 2) == []  # woken, nothing to take: back before 5 s


def test_ttl_delay_route_rounds_up_never_early() -> None:
    assert ttl_delay_route("q", None, 50, 1000) is None
    assert ttl_delay_route("q", 900, 50, 1000) is None
    r = ttl_delay_route("q", 1001, 50, 1000)
    assert r is not None and (r.queue, r.target, r.ttl) == ("q.delay.50", "q", 50)
    r = ttl_delay_route("q", 1101, 50, 1000)
    assert r is not None and r.ttl == 150 and r.expires == 150 + 60_000
    declared: dict[str, float] = {}
    assert r.due(declared) and not r.due(declared)


def test_held_leases_renews_and_settles_once() -> None:
    renewed: list[list[str]] = []
    held: HeldLeases[str] = HeldLeases(renewed.append, 0.02, "test-leases")
    try:
        held.add("a", Delivery(Message("a", b""), 1, "a"))
        held.add("b", Delivery(Message("b", b""), 1, "b"))
        assert held.room(3, 10) == 1 and "a" in held
        wait_for(lambda: any(sorted(r) == ["a", "b"] for r in renewed), 5, what="a renewal")
        assert held.take(["a", "a", "x"]) == ["a"]
        assert held.take(["a"]) == []
    finally:
        assert held.close() == ["b"]
