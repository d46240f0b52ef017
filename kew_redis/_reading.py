"""What the two consumers of the Redis provider (the sync
:class:`~kew_redis.provider.RedisConsumer` and the native async
:class:`~kew_redis._aio_consumer.RedisAsyncConsumer`) share of reading a
queue: when to do the housekeeping and how long to block, the delivery
counts of reclaimed entries, and the dead letters of entries kew cannot
read.  No I/O here: each consumer runs the commands on its own client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kew_redis import _entries as entry

log = logging.getLogger("kew.redis")

#: The consumer group of every queue.
GROUP = "kew"
#: How often (ms) a busy consumer moves due delayed messages and reclaims idle entries.
HOUSEKEEPING_MS = 250


class Housekeeping:
    """When a consumer next moves due delayed messages and reclaims idle
    entries: every :data:`HOUSEKEEPING_MS` while it fetches, and whenever a
    known delayed message is due; between, one XREADGROUP per fetch."""

    __slots__ = ("at", "next_due")

    def __init__(self) -> None:
        self.at = 0  # epoch ms: the next run of the mover and the reclaim
        self.next_due: int | None = None  # epoch ms of the next delayed message

    def due(self, now: int) -> bool:
        """Whether the housekeeping is due at ``now`` (epoch ms)."""
        return now >= self.at or (self.next_due is not None and now >= self.next_due)

    def done(self, now: int, next_due: int | None) -> None:
        """The housekeeping ran at ``now``; the mover said when the next
        delayed message is due."""
        self.next_due = next_due
        self.at = now + HOUSEKEEPING_MS

    def block_ms(self, now: int, deadline: float, lease_ms: int) -> int:
        """How long an XREADGROUP may block (ms, at least 1): until the
        fetch's ``deadline`` (monotonic), but waking for the next delayed
        message and the next housekeeping (never late by more than
        :data:`HOUSEKEEPING_MS`), and at most a third of the lease."""
        block = max(0.0, deadline - time.monotonic())
        wake = self.at if self.next_due is None else min(self.at, self.next_due)
        block = min(block, max(0.0, (wake - now) / 1000), lease_ms / 3000)
        return max(1, round(block * 1000))


def pending_counts(infos: Sequence[Any]) -> dict[str, int]:
    """The delivery counts by entry id of XPENDING replies (one
    ``xpending_range(..., id, id, 1)`` per reclaimed entry)."""
    counts = {}
    for info in infos:
        if info:
            counts[entry.text(info[0]["message_id"])] = int(info[0]["times_delivered"])
    return counts


def bury(pipe: Any, stream: str, dead: str, bad: Sequence[entry.Bad], gone: Sequence[str]) -> None:
    """Queue in ``pipe`` (a MULTI) the dead letters of ``bad`` (entry id,
    what was kept, count, reason) and the XACK + XDEL of them and of
    ``gone`` (entries deleted while pending)."""
    for _, m, count, reason in bad:
        pipe.xadd(dead, entry.dead_fields(m, count, reason))
    tags = [eid for eid, *_ in bad] + list(gone)
    pipe.xack(stream, GROUP, *tags)
    pipe.xdel(stream, *tags)


def buried(stream: str, bad: Sequence[entry.Bad]) -> None:
    """Log the dead letters :func:`bury` made, once stored."""
    for eid, m, _, reason in bad:
        log.warning(
            "kew: dead-lettered entry %s of %s (message id %r): %s", eid, stream, m.id, reason
        )
