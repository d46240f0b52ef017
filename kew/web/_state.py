"""What kew.web's route modules share: the per-application
:class:`WebState`, and running a blocking call off the event loop.

:func:`kew.web.create_app` keeps the :class:`WebState` in the application's
``state``; a handler takes Litestar's reserved ``state: State`` parameter
and reads it with :func:`web_state`, as do the guard and the lifespan
hooks (from ``connection.app.state``, ``asgi.state``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import anyio.to_thread
from litestar.datastructures import State

from kew.web.auth import Sessions
from kew.web.backend import Backend, TaskApp
from kew.web.config import WebConfig

R = TypeVar("R")

#: The key of the :class:`WebState` in ``Litestar.state``.
STATE_KEY = "kew.web"


@dataclass(frozen=True)
class WebState:
    """One served app: the task app, the settings, serialised access to the
    broker and store, and the page logins."""

    app: TaskApp
    config: WebConfig
    backend: Backend
    sessions: Sessions


def web_state(state: State) -> WebState:
    """The :class:`WebState` in an application's ``state``."""
    return cast(WebState, state[STATE_KEY])


async def in_thread(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in a worker thread (the broker and store block)."""
    return await anyio.to_thread.run_sync(partial(fn, *args))
