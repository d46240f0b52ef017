"""Queue routes: every queue's depths, a queue's dead letters, and putting
them back or deleting them (``admin``; each logged at INFO by
``kew.web.audit`` with who asked: the token's name, never the token)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from kew.web import validate
from kew.web._errors import ADMIN_ERRORS, AUTH_ERRORS, BadValue, NoSuchQueue, invalid
from kew.web._state import audited, id_list, web_state
from kew.web.backend import Backend, DeadLetterOut, QueueInfo


class DeadLetterIds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which dead letters: ``ids``, or all of them when absent."""

    ids: list[str] | None = None


class Count(msgspec.Struct, frozen=True):
    """How many dead letters a requeue or purge acted on."""

    count: int


def _known(backend: Backend, queue: str) -> str:
    if not backend.known(queue):
        raise NoSuchQueue(detail=f"no queue named {queue!r}")
    return queue


@get(
    "/queues",
    summary="Every queue: depths",
    raises=AUTH_ERRORS,
    tags=["queues"],
)
async def queues(state: State) -> list[QueueInfo]:
    """Every queue of the app with its depths."""
    return await web_state(state).backend.queue_infos()


@get(
    "/queues/{queue:str}/dead",
    summary="A queue's dead letters",
    raises=[NoSuchQueue, *AUTH_ERRORS],
    tags=["queues"],
)
async def dead_letters(
    state: State,
    queue: Annotated[str, Parameter(description="queue name")],
    limit: int = Parameter(default=100, ge=1, le=1000),
) -> list[DeadLetterOut]:
    """Up to ``limit`` dead letters of ``queue``."""
    backend = web_state(state).backend
    return await backend.dead_letters(_known(backend, queue), limit)


async def _on_dead(
    act: Callable[[Backend, str, list[str] | None], Awaitable[int]],
    queue: str,
    request: Request[Any, Any, Any],
) -> Count:
    """``act`` (requeue, purge) on the dead letters of ``queue`` whose
    ids the body lists (all of them if it is empty); how many."""
    backend = web_state(request.app.state).backend
    _known(backend, queue)
    ids: list[str] | None = None
    body = await request.body()
    if body.strip():
        try:
            ids = validate.parse(body, DeadLetterIds).ids
        except validate.Invalid as bad:
            raise invalid(bad) from None
    verb = "requeued" if act is Backend.requeue else "purged"
    count = await audited(
        request,
        act(backend, queue, ids),
        lambda n: f"{verb} {n} dead letter(s) of {queue!r} (asked: {id_list(ids)}) via API",
    )
    return Count(count)


@post(
    "/queues/{queue:str}/dead/requeue",
    status_code=200,
    summary="Put dead letters back on their queue (admin)",
    raises=[NoSuchQueue, BadValue, *ADMIN_ERRORS],
    tags=["queues"],
    opt={"scope": "admin"},
)
async def requeue(
    queue: Annotated[str, Parameter(description="queue name")],
    request: Request[Any, Any, Any],
) -> Count:
    """Put the dead letters the body lists (or all) back on ``queue``."""
    return await _on_dead(Backend.requeue, queue, request)


@post(
    "/queues/{queue:str}/dead/purge",
    status_code=200,
    summary="Delete dead letters (admin)",
    raises=[NoSuchQueue, BadValue, *ADMIN_ERRORS],
    tags=["queues"],
    opt={"scope": "admin"},
)
async def purge(
    queue: Annotated[str, Parameter(description="queue name")],
    request: Request[Any, Any, Any],
) -> Count:
    """Delete the dead letters of ``queue`` the body lists (or all)."""
    return await _on_dead(Backend.purge, queue, request)


#: The queue routes.
QUEUE_ROUTES: list[HTTPRouteHandler] = [queues, dead_letters, requeue, purge]
