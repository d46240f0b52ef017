"""Idempotent handlers: a side effect once per key, despite redelivery.

kew delivers at least once: a handler may run again for a message whose
first run did its work but died (or lost its connection) before the ack.
An :class:`IdempotencyStore` remembers which keys (task ids, message ids,
"batch 42 reported") are done, on the same backend as the queues where it
can (SQLite, Redis, memory), or on one you name::

    store = kew.idempotency.open_store(conn, "thumbnails")   # the queues' backend
    store = kew.idempotency.open_store("sqlite:///app.db", "imports")  # for RabbitMQ/STOMP

    # 1. claim, run, mark done: at most one runner at a time; a crashed
    #    claimer's lease runs out and the key can be claimed again.
    with store.once(task_id) as first:
        if first:
            send_mail(...)

    # 2. the effect in the same transaction as the done mark: exactly once.
    store.atomic_once(task_id, lambda db: db.execute("INSERT INTO results ...", ...))

The window, exactly: with ``once``/``run_once`` the effect happens, then
the key is marked done.  A crash (or a lost connection) between the two
leaves the claim to run out, and the effect runs again: *at most one
repetition per crash in that window*, never two runners at once while the
claimer lives.  ``atomic_once`` has no window: the effect's writes and the
mark commit together (SQLite: the effect gets the ``sqlite3.Connection``;
Redis: a pipeline in MULTI; memory: ``None``, under the store's lock), so
an effect written there happens exactly once.  See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kew.qchan.spi import ConfigError, Connector, KewError
from kew.qchan.spi.dedupe import ClaimResult, DedupeCapable, DedupeStore

__all__ = [
    "DEFAULT_RETENTION",
    "IdempotencyStore",
    "StillClaimed",
    "open_store",
]

R = TypeVar("R")

DEFAULT_RETENTION = 7 * 24 * 3600.0
"""How long a done mark is kept by default (seconds): 7 days.  A message
redelivered (or a dead letter requeued) later than that runs again."""

#: Records past their retention are dropped after every this many done marks.
PURGE_EVERY = 1000

_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_MAX_KEY = 1000


class StillClaimed(KewError):
    """Another live runner holds the claim on a key for longer than the
    caller would wait (the same task delivered twice at once)."""

    def __init__(self, namespace: str, key: str, waited: float) -> None:
        super().__init__(
            f"key {key!r} in idempotency namespace {namespace!r} is still claimed by "
            f"another runner after waiting {waited:.1f}s; retry later"
        )
        self.key = key


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"an idempotency key must be a str, not {type(key).__name__}")
    if not key or len(key) > _MAX_KEY:
        raise ValueError(f"an idempotency key must have 1-{_MAX_KEY} characters, not {len(key)}")
    return key


def open_store(
    backend: Connector | str,
    namespace: str = "default",
    *,
    lease: float = 30.0,
    retention: float | None = DEFAULT_RETENTION,
) -> IdempotencyStore:
    """A store on ``backend``: a connector whose provider keeps dedupe
    records (``sqlite``, ``redis``/``rediss``, ``memory``), or the URL of one.

    ``namespace`` separates stores on one backend (letters, digits, ``_.-``).
    ``lease`` (seconds): how long a claim lasts without being extended; the
    store extends the claims of running effects every lease/3, so only a
    dead runner's claim runs out.  ``retention`` (seconds, ``None``: for
    ever): how long a done mark is kept.
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(
            f"invalid idempotency namespace {namespace!r}: use 1-100 letters, digits, "
            "'_', '.', '-', not starting with '.' or '-'"
        )
    if not lease > 0:
        raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
    if retention is not None and not retention > 0:
        raise ValueError(f"retention must be positive seconds or None, not {retention!r}")
    owns = False
    if isinstance(backend, str):
        from kew.connect import connect

        backend = connect(backend)
        owns = True
    if not isinstance(backend, DedupeCapable):
        url = getattr(backend, "url", "?")
        if owns:
            backend.close()
        raise ConfigError(
            f"{url} cannot keep idempotency records (its provider has no dedupe store); "
            "pass the URL of one that can: sqlite:///path, redis://host:port"
        )
    store = backend.dedupe_store(namespace)
    return IdempotencyStore(
        store, lease=lease, retention=retention, connector=backend if owns else None
    )


class IdempotencyStore:
    """Claims and done marks for keys of one namespace (see the module)."""

    def __init__(
        self,
        store: DedupeStore,
        *,
        lease: float = 30.0,
        retention: float | None = DEFAULT_RETENTION,
        connector: Any = None,
    ) -> None:
        self.backend = store
        self.namespace = store.namespace
        self.lease = lease
        self.retention = retention
        self._lease_ms = max(1, round(lease * 1000))
        self._retain_ms = None if retention is None else max(1, round(retention * 1000))
        self._connector = connector  # closed with the store when open_store made it
        self._active: dict[str, str] = {}  # key -> token of claims being run here
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None
        self._marks = 0

    def __repr__(self) -> str:
        return (
            f"IdempotencyStore({self.namespace!r}, lease={self.lease}, retention={self.retention})"
        )

    # -- claim, run, mark done -------------------------------------------

    @contextmanager
    def once(self, key: str, *, wait: float | None = None) -> Iterator[bool]:
        """Yield True if the caller should do the effect of ``key`` now (it
        holds the claim), False if the key is done already.

        On a normal exit the key is marked done; if the block raises, the
        claim is dropped (the effect is taken not to have happened) and the
        error propagates.  While another live runner holds the claim, wait
        up to ``wait`` seconds (default: twice the lease) for it to finish
        or die, then raise :class:`StillClaimed`.
        """
        key = _check_key(key)
        token = os.urandom(12).hex()
        if not self._claim(key, token, 2 * self.lease if wait is None else wait):
            yield False
            return
        self._hold(key, token)
        try:
            yield True
        except BaseException:
            self._unhold(key)
            self.backend.release(key, token)
            raise
        self._unhold(key)
        self.backend.complete(key, token, self._retain_ms)
        self._upkeep()

    def run_once(self, key: str, fn: Callable[[], object], *, wait: float | None = None) -> bool:
        """Call ``fn()`` unless ``key`` is done; True if it was called.
        Same claims and window as :meth:`once`."""
        with self.once(key, wait=wait) as first:
            if first:
                fn()
        return first

    def atomic_once(self, key: str, effect: Callable[[Any], object]) -> bool:
        """Run ``effect(handle)`` unless ``key`` is done, marking it done in
        the same backend transaction; True if it ran.  ``handle``: SQLite, the
        ``sqlite3.Connection`` in the transaction (write to this database;
        do not commit); Redis, a pipeline in MULTI (queue commands; they run
        with the mark in one MULTI/EXEC, so no reads); memory, ``None`` (the
        effect runs under the store's lock; memory has nothing to roll back).
        If ``effect`` raises, the key is not marked, its transaction's writes
        are discarded (SQLite, Redis), and the error propagates."""
        ran = self.backend.atomic_once(_check_key(key), effect, self._retain_ms)
        self._upkeep()
        return ran

    def _claim(self, key: str, token: str, wait: float) -> bool:
        deadline = time.monotonic() + wait
        pause = 0.02
        while True:
            result = self.backend.claim(key, token, self._lease_ms)
            if result is ClaimResult.CLAIMED:
                return True
            if result is ClaimResult.DONE:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise StillClaimed(self.namespace, key, wait)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.5)

    def _upkeep(self) -> None:
        """Every PURGE_EVERY marks, drop the records past their retention."""
        with self._lock:
            self._marks += 1
            due = self._marks % PURGE_EVERY == 0
        if due:
            with contextlib.suppress(Exception):  # upkeep never fails an effect
                self.backend.purge_expired()

    # -- the lease keeper: extends the claims of effects running here -----

    def _hold(self, key: str, token: str) -> None:
        with self._lock:
            self._active[key] = token
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep, name=f"kew-once-{self.namespace}", daemon=True
                )
                self._keeper.start()

    def _unhold(self, key: str) -> None:
        with self._lock:
            self._active.pop(key, None)

    def _keep(self) -> None:
        while not self._closed.wait(self.lease / 3):
            with self._lock:
                active = list(self._active.items())
            for key, token in active:
                # the backend may be down for a moment: two more tries before the lease ends
                with contextlib.suppress(Exception):
                    self.backend.extend(key, token, self._lease_ms)

    # -- inspection and upkeep --------------------------------------------

    def state(self, key: str) -> str | None:
        """``"done"``, ``"claimed"`` or ``None``."""
        return self.backend.state(_check_key(key))

    def is_done(self, key: str) -> bool:
        """Whether ``key`` is marked done (and not yet past its retention)."""
        return self.state(key) == "done"

    def forget(self, key: str) -> None:
        """Forget ``key``: its effect may run again (an operator's tool)."""
        self.backend.forget(_check_key(key))

    def purge_expired(self) -> int:
        """Drop records past retention (or lease); how many, -1 if the
        backend expires them itself (Redis)."""
        return self.backend.purge_expired()

    def close(self) -> None:
        """Stop extending claims and close the backend (and the connector, when
        :func:`open_store` was given a URL and made it)."""
        self._closed.set()
        if self._keeper is not None:
            self._keeper.join()
        self.backend.close()
        if self._connector is not None:
            self._connector.close()

    def __enter__(self) -> IdempotencyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
