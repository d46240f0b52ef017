"""Plumbing that providers share, so that each provider module keeps only
its broker's own tricks (Kombu's virtual transport, far smaller).

* :class:`Backoff`: reconnect delays, exponential with jitter.
* :class:`DeliveryBuffer`: deliveries that a provider's I/O thread receives,
  handed to ``fetch``; those of a lost connection are dropped (the broker
  redelivers them).
* :func:`ttl_delay_route`: delayed delivery on brokers without it, through
  TTL "delay queues" that dead-letter into the target when they expire
  (RabbitMQ, RabbitMQ-STOMP).
* :class:`HeldLeases`: the deliveries a consumer holds, and the thread that
  renews their leases (brokers where an idle delivery is taken back after a
  lease: Redis Streams, SQLite).
"""

from __future__ import annotations

import logging
import queue as queue_mod
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kew.qchan.spi import Delivery

__all__ = [
    "DELAY_EXPIRES",
    "Backoff",
    "DelayRoute",
    "DeliveryBuffer",
    "HeldLeases",
    "ttl_delay_route",
]

log = logging.getLogger("kew.provider")

K = TypeVar("K")


# -- reconnecting ------------------------------------------------------------


class Backoff:
    """Delays between reconnect attempts: ``first``, doubling up to
    ``most`` seconds, each with "equal jitter" (half fixed, half random) so
    that many consumers that lost one broker do not come back in step."""

    def __init__(self, first: float = 0.1, most: float = 2.0) -> None:
        self.first = first
        self.most = most
        self._next = first

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self._next = self.first

    def delay(self) -> float:
        """The next delay in seconds (and double the one after)."""
        base = self._next
        self._next = min(base * 2, self.most)
        return base / 2 + random.uniform(0, base / 2)

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Sleep the next delay; True if ``stop`` was set meanwhile."""
        seconds = self.delay()
        if stop is None:
            time.sleep(seconds)
            return False
        return stop.wait(seconds)


# -- deliveries from an I/O thread ----------------------------------------------


class DeliveryBuffer:
    """Deliveries an I/O thread received, for ``fetch``.  Each is put with
    the generation (connection number) it came on; ``fetch`` hands out only
    those of the current generation, since a lost connection's deliveries
    are redelivered by the broker."""

    def __init__(self) -> None:
        self._queue: queue_mod.Queue[tuple[int, Delivery] | None] = queue_mod.Queue()

    def put(self, generation: int, delivery: Delivery) -> None:
        """From the I/O thread: one delivery received on ``generation``."""
        self._queue.put((generation, delivery))

    def wake(self) -> None:
        """Wake a ``take`` that waits (on close, or when a connection is lost)."""
        self._queue.put(None)

    def drop(self) -> None:
        """Forget what is buffered (a lost connection's deliveries)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue_mod.Empty:
                return

    def take(self, max_count: int, timeout: float, current: Callable[[], int]) -> list[Delivery]:
        """Wait up to ``timeout`` for a delivery, then take what else is
        there, up to ``max_count``, of generation ``current()``."""
        out: list[Delivery] = []
        deadline = time.monotonic() + timeout
        while len(out) < max_count:
            try:
                if out:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                break
            if item is None:  # woken: return what there is
                break
            generation, delivery = item
            if generation == current():
                out.append(delivery)
        return out


# -- delayed delivery through TTL queues -------------------------------------------

#: A delay queue expires ``bucket + DELAY_EXPIRES`` ms after it was last
#: declared (publishing does not count as use); a provider redeclares it
#: when its last declare is older than half that (:meth:`DelayRoute.due`),
#: so a message sent to it always expires into its target first.
DELAY_EXPIRES = 60_000


@dataclass(frozen=True)
class DelayRoute:
    """Where a delayed message goes: ``queue`` (``<target>.delay.<bucket>``),
    whose messages expire after ``ttl`` ms into ``target``."""

    queue: str
    target: str
    ttl: int

    @property
    def expires(self) -> int:
        """The delay queue's own expiry (ms after its last declare)."""
        return self.ttl + DELAY_EXPIRES

    def due(self, declared: dict[str, float]) -> bool:
        """Whether the delay queue needs declaring now (and note it)."""
        now = time.monotonic()
        if now - declared.get(self.queue, -1e9) < DELAY_EXPIRES / 2000:
            return False
        declared[self.queue] = now
        return True


def ttl_delay_route(
    target: str, deliver_at: int | None, granularity: int, now: int
) -> DelayRoute | None:
    """The delay queue for a message due at ``deliver_at`` (epoch ms), or
    None to send it to ``target`` now.  Delays are rounded *up* to a
    multiple of ``granularity`` ms (never early), so that messages of
    similar delays share a queue (TTL queues expire in order)."""
    if deliver_at is None or deliver_at <= now:
        return None
    delay = deliver_at - now
    bucket = -(-delay // granularity) * granularity
    return DelayRoute(f"{target}.delay.{bucket}", target, bucket)


# -- held deliveries and their leases -----------------------------------------------


class HeldLeases(Generic[K]):
    """The deliveries a consumer holds (by key), and a thread that renews
    their leases every ``interval`` seconds with ``renew(keys)`` until
    :meth:`close`.  A renewal that raises is logged and tried again at the
    next interval; the thread never dies of it."""

    def __init__(self, renew: Callable[[Sequence[K]], None], interval: float, name: str) -> None:
        self.lock = threading.Lock()
        self._held: dict[K, Delivery] = {}
        self._renew = renew
        self._interval = interval
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self.lock:
            return len(self._held)

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return key in self._held

    def add(self, key: K, delivery: Delivery) -> None:
        with self.lock:
            self._held[key] = delivery

    def take(self, keys: Collection[K]) -> list[K]:
        """Stop holding these keys; returns those that were held (a key
        settled twice is settled once)."""
        with self.lock:
            return [k for k in keys if self._held.pop(k, None) is not None]

    def keys(self) -> list[K]:
        with self.lock:
            return list(self._held)

    def room(self, prefetch: int, most: int) -> int:
        """How many more deliveries fit under ``prefetch`` (at most ``most``)."""
        with self.lock:
            return max(0, min(most, prefetch - len(self._held)))

    def _loop(self) -> None:
        while not self._closed.wait(self._interval):
            keys = self.keys()
            if not keys:
                continue
            try:
                self._renew(keys)
            except Exception:
                log.exception("kew: renewing the leases of %d deliveries failed", len(keys))

    def close(self) -> list[K]:
        """Stop renewing; returns the keys still held (to hand back)."""
        self._closed.set()
        with self.lock:
            keys = list(self._held)
            self._held.clear()
        return keys
