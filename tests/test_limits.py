"""Per-queue maximum depth on every broker the machine runs: QueueFull to
the producer (back-pressure), nothing of a refused batch sent, room again
once consumed.  (Maximum message size: the conformance kit, every provider,
and tests/test_crypto_limits.py; maximum REST body: tests/test_web.py.)"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

import kew
from kew.testing.util import port_open, require, wait_for

URLS = {
    "memory": "memory://limits",
    "redis": "redis://127.0.0.1:6379/15?prefix=limits",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}
PORTS = {"redis": 6379, "rabbitmq": 5672}


@pytest.fixture(params=list(URLS))
def bounded(request: pytest.FixtureRequest) -> Iterator[kew.Queue[int]]:
    kind = str(request.param)
    if kind in PORTS:
        require(port_open("127.0.0.1", PORTS[kind]), f"no {kind} on 127.0.0.1:{PORTS[kind]}")
    c = kew.connect(URLS[kind])
    name = f"limits-{os.urandom(4).hex()}"
    q = kew.Queue(c, name, int, max_depth=3)
    yield q
    q.close()
    c.delete(name)
    c.close()


def test_max_depth_refuses_sends_with_queue_full(bounded: kew.Queue[int]) -> None:
    q = bounded
    q.send_many([1, 2])
    q.send(3)
    with pytest.raises(kew.QueueFull, match=rf"queue '{q.name}' is full: 3 messages, limit 3"):
        q.send(4)
    with pytest.raises(kew.QueueFull) as e:
        q.send_many([4, 5])
    assert (e.value.queue, e.value.depth, e.value.limit) == (q.name, 3, 3)
    assert sorted(q.browser().peek(10)) == [1, 2, 3]  # nothing of the refused sends
    seen: list[int] = []
    got = threading.Event()

    def handle(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            got.set()

    with q.sink(handle):
        assert got.wait(20)

    def room() -> bool:
        try:
            q.send(4)
        except kew.QueueFull:
            return False
        return True

    wait_for(room, 20, what="room in the queue once consumed")
    assert sorted(seen) == [1, 2, 3]
