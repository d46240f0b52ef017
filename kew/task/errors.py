"""What a task handler raises to steer its retries.

Any other exception fails the attempt and the queue's retry policy decides
whether (and when) the task runs again.
"""

from __future__ import annotations

__all__ = ["Permanent", "Retry", "TimeLimitExceeded"]


class Permanent(Exception):
    """Give up now: the task fails for good, whatever the retry policy says
    (bad input, a resource that is gone).  The exceeded handler runs, and the
    task's message goes to the queue's dead letters with this error."""


class Retry(Exception):
    """Fail this attempt and retry; ``after`` (seconds), when given,
    replaces the policy's delay.  The policy still decides whether another
    attempt is allowed at all."""

    def __init__(self, message: str = "", *, after: float | None = None) -> None:
        super().__init__(message)
        if after is not None and not after >= 0:
            raise ValueError(
                f"Retry(after=...) must be a non-negative number of seconds, not {after!r}"
            )
        self.after = after


class TimeLimitExceeded(Exception):
    """An async handler ran past its ``time_limit`` (``@app.task(time_limit=...)``)
    and was cancelled.  It fails the attempt like any other exception: the
    queue's retry policy decides whether the task runs again."""
