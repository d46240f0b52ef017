"""An optional provider extension: a dedupe store for idempotent handlers.

A provider whose backend can keep small records atomically (SQLite, Redis,
memory) offers ``Connector.dedupe_store(namespace)``; kew detects it with
:class:`DedupeCapable` (a runtime-checkable Protocol), never by scheme.
Providers without a key-value store (RabbitMQ, STOMP) simply do not have the
method; their users pass the URL of one that does (``sqlite:///...``,
``redis://...``).  ``kew.idempotency`` builds the user-facing API on this.

A record is per ``(namespace, key)`` and is one of: absent; *claimed* by a
token until a lease end; *done* until a retention end (or for ever).  Every
method is atomic on the backend; times are milliseconds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


class ClaimResult(enum.Enum):
    #: The caller now holds the claim (it was free, its lease had run out,
    #: or the caller held it already).
    CLAIMED = "claimed"
    #: The key is marked done: the effect happened.
    DONE = "done"
    #: Another token holds a live claim.
    HELD = "held"


class DedupeStore(Protocol):
    namespace: str

    def claim(self, key: str, token: str, lease_ms: int) -> ClaimResult:
        """Claim ``key`` for ``token`` until now + ``lease_ms``, unless it
        is done or another token's lease has not run out."""
        ...

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        """Push ``token``'s lease to now + ``lease_ms``; False if it no
        longer holds the claim."""
        ...

    def complete(self, key: str, token: str, retain_ms: int | None) -> bool:
        """Mark ``key`` done (kept ``retain_ms``, ``None``: for ever),
        whoever holds it; True if ``token`` still held the claim."""
        ...

    def release(self, key: str, token: str) -> None:
        """Drop ``token``'s claim (the effect did not happen)."""
        ...

    def atomic_once(self, key: str, effect: Callable[[Any], object], retain_ms: int | None) -> bool:
        """If ``key`` is not done, run ``effect(handle)`` and mark the key
        done in the *same* backend transaction; True if it ran.  ``handle``
        is the backend's transaction (documented by each provider)."""
        ...

    def state(self, key: str) -> str | None:
        """``"done"``, ``"claimed"`` (a live lease) or ``None``."""
        ...

    def forget(self, key: str) -> None:
        """Remove any record of ``key`` (so its effect may run again)."""
        ...

    def purge_expired(self) -> int:
        """Drop records past their retention or lease; how many (or -1)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DedupeCapable(Protocol):
    """A connector that can keep a dedupe store on its own backend."""

    def dedupe_store(self, namespace: str) -> DedupeStore: ...
