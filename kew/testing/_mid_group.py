"""``python -m kew.testing._mid_group URL QUEUE``: consume with grouped
acks, and hang mid-group, for the conformance kit to SIGKILL.

The subscription (concurrency 2, prefetch 8) acks in groups
(``GroupAck``).  Its consumer's first commit goes through (``COMMITTED
<ids>``), the second never ends (``COMMITTING <ids>``): the acks handed
over after it wait.  Each handler prints ``RETURNED <id>`` as it returns;
the second to start waits for the first commit (so that it holds one ack
alone); the seventh, once the second commit hangs, never returns (``STUCK
<id>``).  What comes back after the kill must be exactly what was not
committed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import kew
from kew.qchan.runtime import Subscription
from kew.qchan.spi import Consumer, Delivery, Message, OutboxConsumer

_SAYING = threading.Lock()


def say(line: str) -> None:
    """One whole line on stdout (two threads print)."""
    with _SAYING:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class _Gated:
    """A real consumer whose first settle goes through and the next ones hang."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.commits = 0
        self.first = threading.Event()
        self.hanging = threading.Event()

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        return self.consumer.fetch(max_count, timeout)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        self.commits += 1
        ids = " ".join(d.message.id for d in acks)
        if self.commits > 1:
            say(f"COMMITTING {ids}")
            self.hanging.set()
            threading.Event().wait()  # never committed
        if isinstance(self.consumer, OutboxConsumer):
            self.consumer.settle(acks, sends)
        else:
            for delivery in acks:
                self.consumer.ack(delivery)
        say(f"COMMITTED {ids}")
        self.first.set()

    def ack(self, delivery: Delivery) -> None:
        self.settle([delivery], [])

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.consumer.dead_letter(delivery, reason)

    def release(self, delivery: Delivery) -> None:
        self.consumer.release(delivery)

    def close(self) -> None:
        self.consumer.close()


def main() -> None:
    url, queue = sys.argv[1], sys.argv[2]
    gated = _Gated(kew.connect(url).consumer(queue, 8))
    lock = threading.Lock()
    seen = [0]

    def handle(_: Consumer, delivery: Delivery) -> bool:
        with lock:
            seen[0] += 1
            nth = seen[0]
        if nth == 2:
            gated.first.wait(20)  # the first commit holds the first ack alone
        if nth == 7:
            gated.hanging.wait(20)  # (so that STUCK comes after COMMITTING)
            say(f"STUCK {delivery.message.id}")
            threading.Event().wait()
        say(f"RETURNED {delivery.message.id}")
        return True  # acked by the subscription, in a group

    Subscription(gated, handle, name=queue, concurrency=2, prefetch=8)
    threading.Event().wait(600)


if __name__ == "__main__":
    main()
