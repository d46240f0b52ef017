"""The adaptive fetch window: how many deliveries a subscription holds.

A delivery is held from the moment the broker hands it over until it is
settled: waiting for a handler, running, then settling (its ack being
committed).  To keep ``concurrency`` handlers busy, the window must cover
the running ones plus those settling and those on their way (Little's law
on the part that is not running)::

    window = concurrency + MARGIN * throughput * (settle + refill)

with ``throughput = concurrency / handler time`` (what the handlers could
take), ``settle`` the mean time from a handler's return to its settle's
end, and ``refill`` the mean time a fetch kept an idle handler waiting (a
round trip on a pull broker; on a push broker, how long its buffer ran
empty).  A window held for fast handlers costs little: the deliveries
beyond the concurrency wait about ``MARGIN * (settle + refill)`` each,
whatever the handler time, so the window is never a reason for another
worker to idle long.  Slow handlers (a mean above :data:`SLOW`, or none
finishing in a whole period while some run) get ``window = concurrency``:
nothing held that another worker could run.

Hysteresis, so that it does not flap: the window changes only to one at
least :data:`FACTOR` times larger or smaller (to the concurrency whenever
handlers are slow), and not within :data:`MIN_INTERVAL` seconds of the
last change; the overhead estimate falls back slowly (half-life
:data:`HALF_LIFE`) after it rose, so a window that ended the waits does
not shrink at once for lack of them.  It is capped at :func:`cap`:
:data:`MAX_WINDOW` deliveries, and :data:`MAX_BYTES` of bodies.

:class:`Window` is what both runtimes (sync and asyncio) keep of it: the
window in effect, when a fetch is worth it, and the changes to ask of the
consumer, which only they know how to call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("kew.consumer")  # (the runtimes' logger)

#: Mean handler time (seconds) above which the window is the concurrency.
SLOW = 0.02
#: The window is at most this many deliveries (or the concurrency, if
#: larger).  Measured with one handler on Redis, no-op handlers: 64 -> 256
#: took the client's CPU per message from 2.4 to 1.9 x a raw redis-py loop
#: (bigger fetches); only handlers of microseconds reach it.
MAX_WINDOW = 256
#: ... and at most this many bytes of bodies (at the mean size seen), so
#: that large messages are not held by the hundred.
MAX_BYTES = 32 * 1024 * 1024
#: Seconds over which the times are averaged before the window is reconsidered.
PERIOD = 0.2
#: ... but the first period (the window still the concurrency, as it
#: starts) ends as soon as this many handlers have returned in it: short
#: handlers need not wait a whole period of one round trip each (on Redis,
#: 0.2 s was some 650 single fetches and acks of a no-op handler).
FIRST_RUNS = 32
#: Seconds at least between two changes of the window (a change may cost a
#: round trip on a push broker: ``WindowedConsumer.set_prefetch``).
MIN_INTERVAL = 1.0
#: A window changes only to one this many times larger or smaller.
FACTOR = 2.0
#: Headroom over Little's law (variance, and the fetch waiting for a
#: quarter of the window to be free).
MARGIN = 2.0
#: Half-life (seconds) of the overhead estimate once it falls.
HALF_LIFE = 10.0


def cap(concurrency: int, mean_size: float = 0.0) -> int:
    """The largest window for ``concurrency`` handlers, for bodies of
    ``mean_size`` bytes on average."""
    most = MAX_WINDOW if mean_size <= 0 else min(MAX_WINDOW, int(MAX_BYTES / mean_size))
    return max(concurrency, most)


class WindowPolicy:
    """Sizes the window of one subscription from what it measures (module
    docstring).  Pure logic, clock injected; not thread-safe: its caller
    serializes the calls (the subscription does, under its lock)."""

    def __init__(self, concurrency: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency = concurrency
        #: The window now.
        self.window = concurrency
        self._clock = clock
        now = clock()
        self._period_start = now
        self._changed_at = -math.inf
        self._overhead = 0.0  # seconds: settle + refill, falling slowly
        self._refill = 0.0  # mean refill of the last period that had one
        self._ran = self._ran_n = 0.0
        self._settle = self._settle_n = 0.0
        self._fill = self._fill_n = 0.0
        self._bytes = self._bodies = 0.0  # (all along: the mean body size)

    # -- what the subscription measures -------------------------------------

    def ran(self, seconds: float, count: int = 1) -> None:
        """``count`` handlers returned after ``seconds`` on average."""
        self._ran += seconds * count
        self._ran_n += count

    def settled(self, seconds: float, count: int = 1) -> None:
        """``count`` deliveries' settles ended, on average ``seconds`` after
        their handlers returned."""
        self._settle += seconds * count
        self._settle_n += count

    def fetched(self, seconds: float) -> None:
        """A fetch that brought deliveries while a handler had nothing to
        run took ``seconds``."""
        self._fill += seconds
        self._fill_n += 1

    def delivered(self, count: int, size: int) -> None:
        """A fetch brought ``count`` deliveries of ``size`` bytes of bodies."""
        self._bodies += count
        self._bytes += size

    # -- deciding -------------------------------------------------------------

    def target(self, running: int) -> int | None:
        """The window the last period's figures call for (ends the period);
        None when they say nothing (no handler ran or is running)."""
        now = self._clock()
        elapsed = max(now - self._period_start, 1e-9)
        c = self.concurrency
        if self._fill_n:
            self._refill = self._fill / self._fill_n
        settle = self._settle / self._settle_n if self._settle_n else 0.0
        overhead = settle + self._refill
        self._overhead = max(overhead, self._overhead * 0.5 ** (elapsed / HALF_LIFE))
        ran, ran_n = self._ran, self._ran_n
        self._period_start = now
        self._ran = self._ran_n = self._settle = self._settle_n = self._fill = self._fill_n = 0.0
        if not ran_n:
            return c if running else None  # a whole period without one finishing: slow
        mean = ran / ran_n
        if mean >= SLOW:
            return c
        wanted = c + MARGIN * (c / max(mean, 1e-6)) * self._overhead
        most = cap(c, self._bytes / self._bodies if self._bodies else 0.0)
        return max(c, min(most, math.ceil(wanted - 1e-9)))  # (float noise)

    def update(self, running: int) -> int | None:
        """Called by the fetch loop, often: once a period has passed,
        reconsider the window.  Returns the new window when it changes
        (then :attr:`window` is it), else None.  ``running``: handlers
        running now."""
        now = self._clock()
        if now - self._period_start < PERIOD and (
            self._ran_n < FIRST_RUNS or self._changed_at != -math.inf
        ):
            return None
        want = self.target(running)
        w = self.window
        if want is None or want == w or now - self._changed_at < MIN_INTERVAL:
            return None
        slow = want == self.concurrency
        if not (slow or want >= FACTOR * w or want * FACTOR <= w):
            return None
        self.window = want
        self._changed_at = now
        return want

    def undo(self, window: int) -> None:
        """The change to :attr:`window` could not be made (the broker
        refused it): back to ``window``, tried again after the interval."""
        self.window = window


class Window:
    """The window in effect for one subscription, shared by the sync and
    async runtimes: what it holds at most (:attr:`size`), when a fetch is
    worth it (:meth:`room`), and the changes its :attr:`policy` decides
    (:meth:`adapt`), which the runtime asks of its consumer (a call, or an
    await) and reports back (:meth:`granted`, :meth:`refused`).  Not
    thread-safe: the sync runtime calls it under its lock."""

    def __init__(
        self,
        name: str,
        concurrency: int,
        prefetch: int | None = None,
        policy: WindowPolicy | None = None,
    ) -> None:
        self.name = name  # (the subscription's, for the log)
        self.concurrency = concurrency
        #: Deliveries held at most now: ``prefetch``, else the concurrency
        #: to start with.  (The policy's window runs ahead of it while the
        #: consumer has yet to grant a larger one.)
        self.size = prefetch or concurrency
        self._refill = max(1, self.size // 4)
        #: Sizes the window; None when it is pinned (``prefetch``) or the
        #: consumer's window cannot change.
        self.policy = policy

    @property
    def grouped(self) -> bool:
        """Acks go in groups: the window leaves slack beyond the concurrency
        for deliveries settling (else one could hold up a handler)."""
        return self.size > self.concurrency

    def room(self, unfinished: int, settling: int) -> int:
        """How many deliveries to fetch now, with ``unfinished`` fetched and
        not finished (waiting or running) and ``settling`` finished but not
        yet settled: the room under the window once it is worth a fetch,
        else 0.  With every handler busy or with work waiting, that is once
        a quarter of the window is free, so that a fetch (a round trip on
        most brokers) brings a batch rather than one delivery (figures:
        docs/tasks.md)."""
        room = self.size - unfinished - settling
        if room <= 0:
            return 0
        if room >= self._refill or unfinished < self.concurrency:
            return room
        return 0

    def adapt(self, running: int) -> tuple[int, int] | None:
        """(old, new) when the policy changes the window (``running``:
        handlers running now), for the caller to ask of its consumer.  A
        smaller one takes effect here; a larger one once granted."""
        policy = self.policy
        if policy is None:
            return None
        old = self.size
        new = policy.update(running)
        if new is None:
            return None
        if new < old:
            self._set(new)
        return old, new

    def granted(self, old: int, new: int) -> bool:
        """The consumer took the change ``old`` -> ``new``: True when the
        window grew (now in effect: more room to fetch)."""
        log.debug("kew: %s: window %d -> %d", self.name, old, new)
        if new > old:
            self._set(new)
            return True
        return False

    def refused(self, old: int, new: int, error: Exception) -> None:
        """The consumer could not make the change ``old`` -> ``new``: a
        larger window is given up (the policy tries again after its
        interval); a smaller one stays in effect here all the same."""
        log.warning(
            "kew: %s: the window could not change from %d to %d: %s", self.name, old, new, error
        )
        if new > old and self.policy is not None:
            self.policy.undo(old)

    def _set(self, size: int) -> None:
        self.size = size
        self._refill = max(1, size // 4)
