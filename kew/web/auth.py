"""Bearer tokens and the monitoring page's login sessions."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence

from kew.web.config import Scope, Token, scope_of


def bearer_scope(tokens: Sequence[Token], header: str) -> Scope | None:
    """The scope of an ``Authorization: Bearer <token>`` header, or None."""
    kind, _, value = header.strip().partition(" ")
    if kind.lower() != "bearer" or not value.strip():
        return None
    return scope_of(tokens, value.strip())


class Sessions:
    """Page logins: a random session id (the cookie) -> scope, in memory.

    The token itself never goes into the cookie; a restart logs everyone out.
    """

    COOKIE = "kew_session"

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[Scope, float]] = {}

    def open(self, scope: Scope) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[sid] = (scope, now + self.lifetime)
        return sid

    def scope(self, sid: str | None) -> Scope | None:
        if not sid:
            return None
        with self._lock:
            found = self._sessions.get(sid)
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def close(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)
