"""The browser: reading a queue and its dead letters with ``basic.get``.

Browsing takes messages with basic.get on a channel of its own and hands
them back by closing it (unacked: requeued): they keep their place, but are
marked redelivered.  On quorum queues they go back *behind* the others and
the peek counts as a delivery, so a quorum connector lacks ``browse``.
Every message is read through :mod:`kew_rabbitmq._envelope`, so messages
kew cannot read (another program's) are listed, requeued and purged too.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from kew.qchan.spi import DeadLetter, Message, QueueStats
from kew_rabbitmq._envelope import dead_letter, properties, read

if TYPE_CHECKING:
    from kew_rabbitmq.provider import RabbitConnector


class RabbitBrowser:
    def __init__(self, connector: RabbitConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._dead = f"{queue}.dead"

    def _count(self, ch: Any, queue: str) -> int:
        return int(ch.queue_declare(queue, passive=True).method.message_count)

    def _handed_back(self, ch: Any, queue: str, expected: int, timeout: float = 5.0) -> None:
        """Wait (bounded) until messages a closed channel handed back are
        counted again: a quorum queue requeues them through its Raft log, so
        a listing or a count right after would miss them.  Consumers may take
        some meanwhile, so this waits at most ``timeout`` and never fails."""
        deadline = time.monotonic() + timeout
        while self._count(ch, queue) < expected and time.monotonic() < deadline:
            time.sleep(0.01)

    def _take(self, ch: Any, queue: str, limit: int) -> list[tuple[Any, Any, bytes]]:
        got: list[tuple[Any, Any, bytes]] = []
        while len(got) < limit:
            method, props, body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            got.append((method, props, body))
        return got

    def peek(self, limit: int) -> Sequence[Message]:
        def peek(conn_ch: Any) -> list[Message]:
            before = self._count(conn_ch, self._queue)
            ch = conn_ch.connection.channel()
            try:
                return [read(p, b)[0] for _, p, b in self._take(ch, self._queue, limit)]
            finally:
                ch.close()  # unacked: requeued in place
                self._handed_back(conn_ch, self._queue, before, timeout=1.0)

        return self._c.run(peek)

    def stats(self) -> QueueStats:
        def stats(ch: Any) -> QueueStats:
            q = ch.queue_declare(self._queue, passive=True).method
            d = ch.queue_declare(self._dead, passive=True).method
            return QueueStats(q.message_count, -1, -1, d.message_count)

        return self._c.run(stats)

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        def dead(conn_ch: Any) -> list[DeadLetter]:
            before = self._count(conn_ch, self._dead)
            ch = conn_ch.connection.channel()
            try:
                letters = [dead_letter(p, b) for _, p, b in self._take(ch, self._dead, limit)]
            finally:
                ch.close()
                self._handed_back(conn_ch, self._dead, before)
            # oldest first: a quorum queue puts what an earlier listing
            # handed back behind later dead letters (stable for equal times)
            return sorted(letters, key=lambda d: d.dead_at)

        return self._c.run(dead)

    def _drain_dead(self, ids: Collection[str] | None, requeue: bool) -> int:
        def drain(conn_ch: Any) -> int:
            before = self._count(conn_ch, self._dead)
            ch = conn_ch.connection.channel()
            ch.confirm_delivery()
            n = 0
            try:
                for method, props, body in self._take(ch, self._dead, 1_000_000):
                    m = read(props, body)[0]
                    if ids is not None and m.id not in ids:
                        continue  # handed back when the channel closes
                    if requeue:
                        ch.basic_publish("", self._queue, body, properties(m))
                    ch.basic_ack(method.delivery_tag)
                    n += 1
            finally:
                ch.close()
                self._handed_back(conn_ch, self._dead, before - n)
            return n

        return self._c.run(drain)

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        return self._drain_dead(ids, requeue=True)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        return self._drain_dead(ids, requeue=False)

    def purge(self) -> int:
        return int(self._c.run(lambda ch: ch.queue_purge(self._queue).method.message_count))

    def close(self) -> None:
        pass
