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
from collections.abc import Callable, Sequence

from kew.qchan.spi import Consumer, Delivery, Message, OutboxConsumer

log = logging.getLogger("kew.consumer")

Handler = Callable[[Consumer, Delivery], None]
"""Processes one delivery and settles it through the consumer."""

SendMany = Callable[[str, Sequence[Message]], None]
"""Sends messages to a queue (by name); returns once the broker has them."""


class GroupSettle:
    """Settles one consumer's deliveries together with outgoing messages
    (an outbox), batching concurrent callers: whoever comes while a batch is
    being committed joins the next one, and each caller returns once its own
    messages are stored and its deliveries acked (or raises if their batch
    failed).  N handlers finishing together cost one commit, not N.

    A consumer with ``settle`` (:class:`OutboxConsumer`) commits a batch in
    one step; for any other, the batch's messages go out first with
    ``send_many`` (one call per queue), then each delivery is acked.  Either
    way a delivery is never acked before the messages are stored, and a
    caller's delivery stays held (counted against prefetch) until then.
    """

    def __init__(self, consumer: Consumer, send_many: SendMany) -> None:
        self._consumer = consumer
        self._send_many = send_many
        self._outbox = consumer if isinstance(consumer, OutboxConsumer) else None
        self._cond = threading.Condition()
        self._acks: list[Delivery] = []
        self._sends: list[tuple[str, Message]] = []
        self._batch = 0  # number of the batch being filled
        self._done = -1  # last batch committed (or failed)
        self._committing = False
        self._errors: dict[int, BaseException] = {}

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        with self._cond:
            self._acks.extend(acks)
            self._sends.extend(sends)
            mine = self._batch
            while True:
                if self._done >= mine:
                    error = self._errors.get(mine)
                    if error is not None:
                        raise error
                    return
                if not self._committing:
                    self._committing = True
                    batch_acks, self._acks = self._acks, []
                    batch_sends, self._sends = self._sends, []
                    number = self._batch
                    self._batch += 1
                    break
                self._cond.wait()
        failure: BaseException | None = None
        try:
            self._commit(batch_acks, batch_sends)
        except BaseException as e:
            failure = e
        with self._cond:
            self._committing = False
            self._done = number
            if failure is not None:
                self._errors[number] = failure
            for old in [n for n in self._errors if n < number - 1000]:
                del self._errors[old]
            self._cond.notify_all()
        if failure is not None:  # number == mine: our own batch
            raise failure

    def _commit(self, acks: list[Delivery], sends: list[tuple[str, Message]]) -> None:
        if self._outbox is not None:
            self._outbox.settle(acks, sends)
            return
        by_queue: dict[str, list[Message]] = {}
        for queue, message in sends:
            by_queue.setdefault(queue, []).append(message)
        for queue, messages in by_queue.items():
            self._send_many(queue, messages)
        for delivery in acks:
            self._consumer.ack(delivery)


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
