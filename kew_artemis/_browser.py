"""The STOMP provider's browser: peek, stats, dead-letter listings, requeue
and purge.  STOMP has no browse of its own; ActiveMQ's ``browser:true``
subscription is used where there is one, elsewhere messages are taken
without an ack and handed back."""

from __future__ import annotations

import queue as queue_mod
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from kew.qchan.spi import BrokerUnavailable, DeadLetter, Message, QueueStats, now_ms
from kew.qchan.spi.wire import H_DEAD_AT, H_DEAD_COUNT, H_DEAD_REASON
from kew_artemis._frames import (
    H_BROKER_ID,
    H_ID,
    _from_frame,
    _int,
    send_headers,
    subscribe_headers,
)
from kew_artemis._link import _Link, _Lost

if TYPE_CHECKING:
    from kew_artemis.provider import StompConnector


class StompBrowser:
    """STOMP has no browse.  ActiveMQ has one (a ``browser:true``
    subscription that ends with a ``browser:end`` message): peek, stats and
    dead-letter listings use it.  Elsewhere messages are taken without an
    ack and handed back by closing the connection (they keep their place
    but are marked redelivered), and a listing ends when no message comes
    for ``browse_idle`` seconds."""

    def __init__(self, connector: StompConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._dead = f"{queue}.dead"

    def _browse(self, queue: str, limit: int) -> list[tuple[dict[str, str], bytes]]:
        """Read up to ``limit`` messages of ``queue`` without removing any."""
        got: list[tuple[dict[str, str], bytes]] = []
        if limit <= 0:
            return got
        end = threading.Event()
        dialect = self._c.dialect

        def on_message(_: _Link, headers: dict[str, str], body: bytes) -> None:
            if dialect == "activemq" and headers.get("browser") == "end":
                end.set()
                return
            if len(got) < limit:
                got.append((headers, body))
            if len(got) >= limit:
                end.set()

        link = _Link(self._c.options, self._c.url, on_message).open()
        try:
            if dialect == "activemq":
                headers = {"browser": "true", "activemq.prefetchSize": "1000"}
                link.frame(link.conn.subscribe, self._c.dest(queue), id="browse", ack="auto",
                           headers=headers)  # fmt: skip
                deadline = time.monotonic() + 60
                while not end.wait(0.1):
                    link.check()
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(f"browsing {queue!r} at {self._c.url} timed out")
            else:
                headers = subscribe_headers(dialect, limit, self._c.options.window_bytes)
                if dialect == "artemis":
                    headers["consumer-window-size"] = "-1"
                link.frame(link.conn.subscribe, self._c.dest(queue), id="browse",
                           ack="client-individual", headers=headers)  # fmt: skip
                self._until_idle(link, lambda: len(got), end)
        except _Lost as e:
            raise BrokerUnavailable(f"browsing {queue!r} at {self._c.url}: {e}") from None
        finally:
            link.close()  # unacked: handed back
        return got

    def _until_idle(self, link: _Link, count: Callable[[], int], end: threading.Event) -> None:
        idle = self._c.options.browse_idle
        seen, last = -1, time.monotonic()
        while not end.is_set():
            link.check()
            n = count()
            if n != seen:
                seen, last = n, time.monotonic()
            elif time.monotonic() - last > idle:
                return
            end.wait(0.02)

    def _take(
        self, queue: str, keep: Callable[[dict[str, str]], bool], on_take: Callable[..., None]
    ) -> int:
        """Consume ``queue``; for each message ``keep`` accepts, call
        ``on_take(link, headers, body)`` then ack it; hand the rest back."""
        dialect = self._c.dialect
        expected = -1
        if dialect == "activemq":
            expected = len(self._browse(queue, 1_000_000))
            if expected == 0:
                return 0
        pending: queue_mod.Queue[tuple[dict[str, str], bytes]] = queue_mod.Queue()
        link = _Link(self._c.options, self._c.url, lambda _, h, b: pending.put((h, b))).open()
        taken = seen = 0
        try:
            headers = subscribe_headers(dialect, 1000, self._c.options.window_bytes)
            if dialect == "artemis":
                headers["consumer-window-size"] = "-1"
            link.frame(link.conn.subscribe, self._c.dest(queue), id="take",
                       ack="client-individual", headers=headers)  # fmt: skip
            idle = self._c.options.browse_idle
            while expected < 0 or seen < expected:
                try:
                    h, body = pending.get(timeout=idle if expected < 0 else max(idle, 5.0))
                except queue_mod.Empty:
                    break
                seen += 1
                if keep(h):
                    on_take(link, h, body)
                    link.frame(link.conn.ack, h.get("ack") or h.get(H_BROKER_ID, ""))
                    taken += 1
            rid = link.new_receipt()  # every ack reached the broker
            link.frame(link.conn.unsubscribe, "take", headers={"receipt": rid})
            link.wait([rid], self._c.options.receipt_timeout)
        except _Lost as e:
            raise BrokerUnavailable(f"draining {queue!r} at {self._c.url}: {e}") from None
        finally:
            link.close()
        return taken

    def peek(self, limit: int) -> Sequence[Message]:
        return [_from_frame(h, b)[0] for h, b in self._browse(self._queue, limit)]

    def _count(self, queue: str) -> int:
        return len(self._browse(queue, 1_000_000))

    def stats(self) -> QueueStats:
        return QueueStats(self._count(self._queue), -1, -1, self._count(self._dead))

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        return [
            DeadLetter(
                _from_frame(h, b)[0],
                _int(h.get(H_DEAD_COUNT), 1),
                h.get(H_DEAD_REASON, ""),
                _int(h.get(H_DEAD_AT)),
            )
            for h, b in self._browse(self._dead, limit)
        ]

    def _wanted(self, ids: Collection[str] | None) -> Callable[[dict[str, str]], bool]:
        chosen = None if ids is None else set(ids)
        return lambda h: chosen is None or (h.get(H_ID) or h.get(H_BROKER_ID)) in chosen

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        dest = self._c.dest(self._queue)

        def requeue(link: _Link, headers: dict[str, str], body: bytes) -> None:
            m, _ = _from_frame(headers, body)
            rid = link.new_receipt()
            wire = send_headers(self._c.dialect, Message(m.id, body, m.headers), now=now_ms())
            link.send(dest, body, wire, rid)
            link.wait([rid], self._c.options.receipt_timeout)

        return self._take(self._dead, self._wanted(ids), requeue)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return self._take(self._dead, self._wanted(ids), lambda *_: None)

    def purge(self) -> int:
        return self._take(self._queue, lambda _: True, lambda *_: None)

    def close(self) -> None:
        pass
