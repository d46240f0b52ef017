"""Bearer tokens, the monitoring page's login sessions and their CSRF tokens.

A request is identified by its ``Authorization: Bearer`` header or, without
one, by the page's session cookie.  A request made with the cookie that
changes anything (any method but GET, HEAD and OPTIONS) must also carry the
session's CSRF token, in the ``X-CSRF-Token`` header or the form field
``csrf``; bearer requests need none (a browser never adds that header on
its own).  :class:`Identity` names who did something, for the audit log:
the token's configured name, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kew.web.config import Scope, Token

#: Methods that change nothing: the cookie alone authenticates them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The header and the form field that carry a session's CSRF token.
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Identity:
    """Who makes a request: the scope and configured name of its token, and
    whether it came through the page's session."""

    scope: Scope
    name: str
    session: bool = False

    def __str__(self) -> str:
        via = "page session of token" if self.session else "token"
        return f"{via} {self.name or '(unnamed)'!r} ({self.scope})"


def token_identity(tokens: Sequence[Token], presented: str) -> Identity | None:
    """The identity of a presented token (the highest scope if several
    match), or None.  Every digest is compared, in constant time."""
    digest = hashlib.sha256(presented.encode()).digest()
    found: Token | None = None
    for t in tokens:
        if hmac.compare_digest(t.digest, digest) and (found is None or found.scope != "admin"):
            found = t
    return Identity(found.scope, found.name) if found is not None else None


def bearer_identity(tokens: Sequence[Token], header: str) -> Identity | None:
    """The identity of an ``Authorization: Bearer <token>`` header, or None."""
    kind, _, value = header.strip().partition(" ")
    if kind.lower() != "bearer" or not value.strip():
        return None
    return token_identity(tokens, value.strip())


def bearer_scope(tokens: Sequence[Token], header: str) -> Scope | None:
    """The scope of an ``Authorization: Bearer <token>`` header, or None."""
    who = bearer_identity(tokens, header)
    return who.scope if who is not None else None


@dataclass(frozen=True)
class Session:
    """A page login: who, its CSRF token, when it ends (monotonic)."""

    identity: Identity
    csrf: str
    expires: float

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf, str(presented))


class Sessions:
    """Page logins: a random session id (the cookie) -> :class:`Session`, in memory.

    The token itself never goes into the cookie; a restart logs everyone out.
    """

    COOKIE = "kew_session"

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(self, identity: Identity | Scope) -> str:
        """A new session for ``identity`` (a bare scope: an unnamed one); its id."""
        if not isinstance(identity, Identity):
            identity = Identity(identity, "")
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        session = Session(
            Identity(identity.scope, identity.name, session=True),
            secrets.token_urlsafe(32),
            now + self.lifetime,
        )
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v.expires > now}
            self._sessions[sid] = session
        return sid

    def get(self, sid: str | None) -> Session | None:
        """The live session of a cookie value, or None."""
        if not sid:
            return None
        with self._lock:
            found = self._sessions.get(sid)
        if found is None or found.expires < time.monotonic():
            return None
        return found

    def scope(self, sid: str | None) -> Scope | None:
        found = self.get(sid)
        return found.identity.scope if found is not None else None

    def close(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)
