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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

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
