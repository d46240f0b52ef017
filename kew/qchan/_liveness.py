"""A subscription's liveness (``alive``, ``healthy()``), shared by the sync
runtime (:mod:`kew.qchan.runtime`) and the asyncio one (``kew.aio._runtime``):
what it saw of its fetches, and the rules.  Asking the broker how much work
waits (a call, or an await) is each runtime's.

Not alive: the consumer failed for good (:class:`ConsumerFailed`), the fetch
loop has not polled for ``10 * poll + 30`` seconds, or fetches have been
failing for longer than ``stall_after``.  Stalled (not healthy): work has
waited on the broker for longer than ``stall_after`` while the subscription
had room and delivered nothing.
"""

from __future__ import annotations

import logging
import time

from kew.qchan.spi import ConsumerFailed

log = logging.getLogger("kew.consumer")

#: Seconds of failing fetches, or of work waiting undelivered while there
#: was room, after which a subscription is no longer alive / healthy.
STALL_AFTER = 60.0


class Liveness:
    """What one subscription saw of its fetches, and what that says."""

    def __init__(self, name: str, poll: float, stall_after: float = STALL_AFTER) -> None:
        self.name = name
        self.poll = poll
        self.stall_after = stall_after
        self.last_fetch = self.last_delivery = time.monotonic()
        #: Why the consumer failed for good (``ConsumerFailed``), else None.
        self.error: BaseException | None = None
        self.failing_since: float | None = None  # first of consecutive failed fetches
        self.waiting_since: float | None = None  # work seen waiting, nothing delivered since

    def alive(self, looping: bool) -> bool:
        """``looping``: not stopping, and the fetch loop runs.  Asks the
        broker nothing."""
        now = time.monotonic()
        failing = self.failing_since
        return (
            looping
            and self.error is None
            and now - self.last_fetch < 10 * self.poll + 30
            and (failing is None or now - failing < self.stall_after)
        )

    # -- what the fetch loop tells ------------------------------------------

    def polled(self) -> None:
        """The fetch loop looked (it had no room to fetch)."""
        self.last_fetch = time.monotonic()

    def fetched(self, count: int) -> None:
        """A fetch returned ``count`` deliveries."""
        now = time.monotonic()
        self.failing_since = None
        self.last_fetch = now
        if count:
            self.last_delivery = now

    def failed(self, error: Exception) -> None:
        """A fetch failed with a passing fault (call it in the ``except``
        block): the first of a run is logged with its traceback."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            log.exception("kew: fetching from %s failed; retrying", self.name)
        else:
            log.warning(
                "kew: fetching from %s still fails after %.0f s; retrying: %s",
                self.name,
                now - self.failing_since,
                error,
            )

    def failed_for_good(self, error: ConsumerFailed) -> None:
        log.error("kew: the consumer of %s failed and cannot recover: %s", self.name, error)
        self.error = error

    # -- stalled? -------------------------------------------------------------

    def busy(self, full: bool) -> bool:
        """Before asking the broker: True if there is no need (every slot
        held: long handlers are progress).  Busy, or something delivered
        since work was seen waiting, starts the watch anew."""
        if full or self.last_delivery > (self.waiting_since or -1.0):
            self.waiting_since = None
        return full

    def stalled(self, waiting: int | None) -> bool:
        """After asking (``waiting``: messages ready, None if the broker
        could not tell): True, and logged, once work has waited longer than
        ``stall_after`` with nothing delivered."""
        if waiting is None:
            return False  # (fetch failures say the rest)
        now = time.monotonic()
        since = self.waiting_since
        if waiting <= 0:
            self.waiting_since = None
            return False
        if since is None:
            self.waiting_since = now
            return False
        if now - since < self.stall_after:
            return False
        log.error(
            "kew: %s has had %d message(s) waiting for %.0f s and delivered none: stalled",
            self.name,
            waiting,
            now - since,
        )
        return True
