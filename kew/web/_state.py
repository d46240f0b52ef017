"""What kew.web's route modules share: the per-application
:class:`WebState`, and who made a request.

:func:`kew.web.create_app` keeps the :class:`WebState` in the application's
``state``; a handler takes Litestar's reserved ``state: State`` parameter
and reads it with :func:`web_state`, as do the guard and the lifespan
hooks (from ``connection.app.state``, ``asgi.state``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from litestar.connection import ASGIConnection
from litestar.datastructures import State

from kew.web.auth import Identity, Sessions
from kew.web.backend import Backend, TaskApp
from kew.web.config import WebConfig
from kew.web.history import DepthHistory, Sampler

R = TypeVar("R")

#: The key of the :class:`WebState` in ``Litestar.state``.
STATE_KEY = "kew.web"
#: Where the guard leaves the request's :class:`~kew.web.auth.Identity` (ASGI scope).
IDENTITY_KEY = "kew.identity"

audit_log = logging.getLogger("kew.web.audit")


@dataclass(frozen=True)
class WebState:
    """One served app: the task app, the settings, its broker and store
    from the event loop, the page logins, the queue depth history (and its
    sampler, while the application runs), and the workers this process runs
    (id -> threads, for the workers view)."""

    app: TaskApp
    config: WebConfig
    backend: Backend
    sessions: Sessions
    history: DepthHistory
    local_workers: dict[str, int] = field(default_factory=dict)
    samplers: list[Sampler] = field(default_factory=list)

    def link(self, path: str) -> str:
        """``path`` (absolute, ``/ui``) under the configured root path."""
        return self.config.root_path + path


def web_state(state: State) -> WebState:
    """The :class:`WebState` in an application's ``state``."""
    return cast(WebState, state[STATE_KEY])


def set_identity(connection: ASGIConnection[Any, Any, Any, Any], who: Identity) -> None:
    cast(dict[str, Any], connection.scope)[IDENTITY_KEY] = who


def identity(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity | None:
    """Who made the request (set by the guard), or None on a public route."""
    found = cast(dict[str, Any], connection.scope).get(IDENTITY_KEY)
    return found if isinstance(found, Identity) else None


def audit(connection: ASGIConnection[Any, Any, Any, Any], what: str) -> None:
    """Log, at INFO, that the request's identity did ``what``."""
    who = identity(connection)
    audit_log.info("audit: %s %s", who if who is not None else "anonymous", what)


async def audited(
    connection: ASGIConnection[Any, Any, Any, Any],
    action: Awaitable[R],
    what: Callable[[R], str],
) -> R:
    """Await ``action``, then log ``what(its result)`` with :func:`audit`:
    both to the end even if the request is cancelled meanwhile (a server
    shutting down), so that what was done is audited."""

    async def act() -> R:
        result = await action
        audit(connection, what(result))
        return result

    return await asyncio.shield(act())


def id_list(ids: list[str] | None, most: int = 10) -> str:
    """Dead-letter ids for the audit log: all of them, or the first ``most``."""
    if ids is None:
        return "all"
    shown = ", ".join(repr(i) for i in ids[:most])
    return f"[{shown}{f', ... {len(ids) - most} more' if len(ids) > most else ''}]"
