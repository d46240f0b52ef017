"""The scheduling surface of a Queue that docs/concepts.md documents:
``send_after``, ``send_at`` and ``scheduling_source()``, on the embedded
SQLite provider (a real, durable broker)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import kew
from kew.core.msg import ChannelMessage, FutureTimepoint
from kew.testing.util import wait_for


def _arrivals(q: kew.Queue[str], n: int) -> dict[str, float]:
    got: dict[str, float] = {}
    lock = threading.Lock()

    def add(x: str) -> None:
        with lock:
            got[x] = time.monotonic()

    with q.sink(add):
        wait_for(lambda: len(got) >= n, 15, what=f"{n} messages")
    return got


def test_send_after_and_scheduling_source_delay_delivery(tmp_path: Path) -> None:
    conn = kew.connect(f"sqlite:///{tmp_path}/s.sqlite3")
    try:
        q = kew.Queue(conn, "sched", str)
        start = time.monotonic()
        q.send_after(0.6, "after")
        source = q.scheduling_source()
        source.send(ChannelMessage("at", FutureTimepoint.after(0.4)))
        source.send_now("now")
        got = _arrivals(q, 3)
        assert got["now"] - start < got["at"] - start
        assert got["at"] - start >= 0.4
        assert got["after"] - start >= 0.6
    finally:
        conn.close()
