"""Retry policies: how long to wait before the next attempt, or give up.

``delay(attempt)`` is asked after attempt ``attempt`` (1 for the first) has
failed; it returns the seconds to wait before attempt ``attempt + 1``, or
``None`` when no further attempt is allowed (the task then fails and the
exceeded handler runs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

__all__ = ["DEFAULT_RETRY", "Exponential", "Intervals", "NoRetry", "RetryPolicy"]


@runtime_checkable
class RetryPolicy(Protocol):
    """How long to wait before the next attempt of a failed task, or whether to give up.

    Anything with this ``delay`` method is a policy (``App.task(retry=...)``);
    :class:`Intervals`, :class:`Exponential` and :class:`NoRetry` are the ones kew has.
    """

    def delay(self, attempt: int) -> float | None:
        """Seconds before attempt ``attempt + 1``; ``None`` = give up."""
        ...


def _seconds(value: float, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}") from None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{what} must be a finite, non-negative number of seconds, not {value!r}")
    return seconds


class Intervals:
    """Fixed waits, Smuggler style: ``Intervals([600, 600, 7200])`` allows
    four attempts, the second 10 minutes after the first fails, and so on.
    ``Intervals.minutes(10, 10, 120, 1440)`` says the same in minutes.  No
    intervals: a single attempt."""

    def __init__(self, seconds: Sequence[float]) -> None:
        if isinstance(seconds, (str, bytes)):
            raise TypeError("Intervals takes a sequence of seconds, not a string")
        self.seconds: tuple[float, ...] = tuple(
            _seconds(s, f"retry interval {i + 1}") for i, s in enumerate(seconds)
        )

    @classmethod
    def minutes(cls, *minutes: float) -> Intervals:
        """Intervals given in minutes: ``Intervals.minutes(10, 120)``."""
        return cls([_seconds(m, f"retry interval {i + 1}") * 60 for i, m in enumerate(minutes)])

    @classmethod
    def of(cls, *seconds: float) -> Intervals:
        """Intervals given as arguments, in seconds: ``Intervals.of(10, 60)``."""
        return cls(seconds)

    @property
    def max_attempts(self) -> int:
        """How many attempts in all: one more than there are intervals."""
        return len(self.seconds) + 1

    def delay(self, attempt: int) -> float | None:
        """The interval after attempt ``attempt`` (1-based) fails; ``None`` past the last."""
        if 1 <= attempt <= len(self.seconds):
            return self.seconds[attempt - 1]
        return None

    def __repr__(self) -> str:
        return f"Intervals({list(self.seconds)!r})"


class Exponential:
    """Exponential backoff with a cap: the wait before attempt ``n + 1`` is
    at most ``min(cap, base * 2 ** (n - 1))`` seconds; ``jitter="full"``
    (the default) draws it uniformly from 0 to that bound, which spreads a
    herd of failing tasks out; ``"none"`` waits the bound exactly.  At most
    ``max_attempts`` attempts in all."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 300.0,
        max_attempts: int = 5,
        jitter: Literal["full", "none"] = "full",
    ) -> None:
        self.base = _seconds(base, "Exponential base")
        self.cap = _seconds(cap, "Exponential cap")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, not {max_attempts!r}")
        if jitter not in ("full", "none"):
            raise ValueError(f"jitter must be 'full' or 'none', not {jitter!r}")
        self.max_attempts = max_attempts
        self.jitter = jitter
        self._random = random.Random()

    def bound(self, attempt: int) -> float:
        """The longest wait after attempt ``attempt`` fails."""
        return min(self.cap, self.base * 2.0 ** min(max(attempt - 1, 0), 1000))

    def delay(self, attempt: int) -> float | None:
        """A wait up to :meth:`bound` (drawn at random with full jitter); ``None`` once
        ``max_attempts`` attempts have run."""
        if attempt >= self.max_attempts:
            return None
        bound = self.bound(attempt)
        return self._random.uniform(0, bound) if self.jitter == "full" else bound

    def __repr__(self) -> str:
        return (
            f"Exponential(base={self.base}, cap={self.cap}, "
            f"max_attempts={self.max_attempts}, jitter={self.jitter!r})"
        )


class NoRetry:
    """A single attempt: any failure is final."""

    max_attempts = 1

    def delay(self, attempt: int) -> float | None:
        """Always ``None``: no further attempt."""
        return None

    def __repr__(self) -> str:
        return "NoRetry()"


DEFAULT_RETRY = Exponential(base=1.0, cap=300.0, max_attempts=5)
"""The policy of a task queue declared without one: up to 5 attempts,
waits drawn from 0-1 s, 0-2 s, 0-4 s, 0-8 s (capped at 5 minutes)."""
