"""The consumer runtime: fetches deliveries and runs a handler on them.

One fetch thread keeps at most ``prefetch`` deliveries unsettled and hands
them to ``concurrency`` handler threads (or runs them inline when
``concurrency`` is 1).  The handler settles each delivery; whatever it
raises is logged and the delivery is handed back, so nothing is lost and the
loop never dies.  ``stop()`` stops fetching, hands back what has not
started, and gives running handlers a grace period before handing theirs
back too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from kew.qchan.spi import Consumer, Delivery

log = logging.getLogger("kew.consumer")

Handler = Callable[[Consumer, Delivery], None]
"""Processes one delivery and settles it through the consumer."""


class Subscription:
    """A running consumer. Use as a context manager, or call ``stop()``."""

    def __init__(
        self,
        consumer: Consumer,
        handler: Handler,
        *,
        name: str,
        concurrency: int = 1,
        prefetch: int | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.name = name
        self.concurrency = concurrency
        self.prefetch = prefetch or concurrency
        if self.prefetch < concurrency:
            raise ValueError(f"prefetch ({self.prefetch}) must be >= concurrency ({concurrency})")
        self._consumer = consumer
        self._handler = handler
        self._poll = poll_interval
        self._cond = threading.Condition()
        self._pending: deque[Delivery] = deque()  # fetched, not started
        self._running = 0  # started, not finished
        self._stopping = False
        self._closed = threading.Event()
        self.last_fetch = time.monotonic()
        self.handled = 0
        self._threads = [
            threading.Thread(target=self._fetch_loop, name=f"kew-fetch-{name}", daemon=True)
        ]
        if concurrency > 1:
            self._threads += [
                threading.Thread(target=self._work_loop, name=f"kew-work-{name}-{i}", daemon=True)
                for i in range(concurrency)
            ]
        for t in self._threads:
            t.start()

    # -- state ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Deliveries held: fetched and not yet settled."""
        with self._cond:
            return len(self._pending) + self._running

    @property
    def alive(self) -> bool:
        """The fetch loop is running and has polled recently."""
        return (
            not self._stopping
            and self._threads[0].is_alive()
            and time.monotonic() - self.last_fetch < 10 * self._poll + 30
        )

    # -- loops ------------------------------------------------------------

    def _fetch_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while (
                        not self._stopping and len(self._pending) + self._running >= self.prefetch
                    ):
                        self._cond.wait(self._poll)
                        self.last_fetch = time.monotonic()
                    if self._stopping:
                        return
                    room = self.prefetch - len(self._pending) - self._running
                try:
                    batch = self._consumer.fetch(room, self._poll)
                except Exception:
                    log.exception("kew: fetching from %s failed; retrying", self.name)
                    self._wait_stopping(1.0)
                    continue
                self.last_fetch = time.monotonic()
                if not batch:
                    continue
                if self.concurrency == 1:
                    for i, delivery in enumerate(batch):
                        if self._stopping:
                            for rest in batch[i:]:
                                self._settle_safely(self._consumer.release, rest)
                            break
                        with self._cond:
                            self._running += 1
                        self._run(delivery)
                else:
                    with self._cond:
                        if not self._stopping:
                            self._pending.extend(batch)
                            self._cond.notify_all()
                            batch = []
                    for late in batch:  # stop() came while fetching: hand these back
                        self._settle_safely(self._consumer.release, late)
        finally:
            self._closed.set()

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                delivery = self._pending.popleft()
                self._running += 1
            self._run(delivery)

    def _run(self, delivery: Delivery) -> None:
        try:
            self._handler(self._consumer, delivery)
        except Exception:
            log.exception("kew: handler for %s failed outside the sink; handing back", self.name)
            self._settle_safely(self._consumer.release, delivery)
        finally:
            with self._cond:
                self._running -= 1
                self.handled += 1
                self._cond.notify_all()

    def _settle_safely(self, settle: Callable[[Delivery], None], delivery: Delivery) -> None:
        try:
            settle(delivery)
        except Exception:
            log.exception(
                "kew: settling a delivery on %s failed; it will be redelivered", self.name
            )

    def _wait_stopping(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)

    # -- stopping ---------------------------------------------------------

    def stop(self, grace: float = 30.0) -> bool:
        """Stop; wait up to ``grace`` seconds for running handlers.

        Deliveries not yet started are handed back at once; those still
        running after the grace period are handed back when the consumer
        closes.  Returns True if every handler finished in time.
        """
        with self._cond:
            if self._stopping and self._closed.is_set() and not self._running:
                return True
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for delivery in pending:
            self._settle_safely(self._consumer.release, delivery)
        deadline = time.monotonic() + grace
        self._closed.wait(max(0.0, deadline - time.monotonic()))
        with self._cond:
            while self._running and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            finished = self._running == 0
        try:
            self._consumer.close()
        except Exception:
            log.exception("kew: closing the consumer of %s failed", self.name)
        return finished

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
