"""What the web front end needs of a task app, and access to it from the
event loop (:class:`Backend`).

:class:`TaskApp` is the part of :class:`kew.task.App` the front end uses,
as a protocol, so that any app of that shape can be served.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from kew.qchan import DeadLetterInfo, Queue
from kew.qchan.spi import Connector
from kew.task.model import TaskRecord, WorkerRecord
from kew.web._broker import WebBroker
from kew.web._store import StoreThread

R = TypeVar("R")


class StoreLike(Protocol):
    def get(self, task_id: str) -> TaskRecord | None: ...
    def output(self, task_id: str, offset: int = 0) -> tuple[str, int]: ...
    def recent(self, limit: int = 50, queue: str | None = None) -> list[TaskRecord]: ...
    def workers(self) -> list[WorkerRecord]: ...


class TaskQueueLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> Any: ...
    @property
    def queue(self) -> Queue[Any]: ...
    def submit(self, data: Any, *, delay: float | None = None, id: str | None = None) -> str: ...
    async def submit_async(
        self, data: Any, *, delay: float | None = None, id: str | None = None
    ) -> str: ...
    def decode_json(self, body: bytes | str) -> Any: ...


class Stoppable(Protocol):
    def stop(self, grace: float = ...) -> object: ...


class WorkerLike(Stoppable, Protocol):
    def start(self) -> object: ...


class TaskApp(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def connector(self) -> Connector: ...
    @property
    def store(self) -> Any: ...
    @property
    def queues(self) -> Mapping[str, Any]: ...
    def queue_names(self) -> list[str]: ...


QueueKind = Literal["task", "outcomes", "events", "queue"]


class QueueInfo(msgspec.Struct, frozen=True):
    """A queue's depths. A provider that cannot count a state reports -1."""

    name: str
    kind: QueueKind
    type: str
    ready: int
    in_flight: int
    delayed: int
    dead: int


class DeadLetterOut(msgspec.Struct, frozen=True):
    """A dead letter: why it died, its headers, its body as text
    (secret-looking JSON fields masked; ``body_base64`` when not UTF-8)."""

    id: str
    reason: str
    delivery_count: int
    dead_at: int
    headers: dict[str, str | int]
    body: str
    body_base64: bool = False


_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|session.?key|api.?key|credential", re.I)
MASK = "***"


def mask_secrets(value: Any) -> Any:
    """``value`` (decoded JSON) with the values of secret-looking keys masked."""
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and _SECRET_KEY.search(k) else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def body_text(body: bytes) -> tuple[str, bool]:
    """A dead letter's body for people: masked JSON, text, or base64."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        import base64

        return base64.b64encode(body).decode(), True
    try:
        value = json.loads(text)
    except ValueError:
        return text, False
    return json.dumps(mask_secrets(value), ensure_ascii=False), False


def type_label(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


class Backend:
    """The served app's broker and store, from the event loop: the broker
    through the web's async connector (:class:`~kew.web._broker.WebBroker`),
    the store on its one thread (:class:`~kew.web._store.StoreThread`)."""

    def __init__(self, app: TaskApp) -> None:
        self.app = app
        self.broker = WebBroker(app.connector)
        self.store = StoreThread(lambda: app.store)

    def open(self) -> None:
        """Connect to the broker (no I/O yet): the application's start."""
        self.broker.open()

    async def close(self) -> None:
        """Close the broker connection and stop the store's thread."""
        await self.broker.close()
        self.store.close()

    async def on_store(self, fn: Callable[[Any], R]) -> R:
        """``fn(store)`` on the store's thread (every store call of kew.web)."""
        return await self.store.run(fn)

    def known(self, name: str) -> bool:
        return name in self.app.queue_names()

    def kind(self, name: str) -> tuple[QueueKind, str]:
        """What a queue is to the app, and the name of its message type."""
        tq = self.app.queues.get(name)
        if tq is not None:
            return "task", type_label(tq.type)
        for tq in self.app.queues.values():
            outcomes = getattr(tq, "outcomes", None)
            if outcomes is not None and getattr(outcomes, "name", None) == name:
                return "outcomes", f"Outcome[{type_label(tq.type)}]"
        events = getattr(self.app, "events", None)
        if getattr(events, "name", None) == name:
            return "events", "TaskEvent"
        for consumer in getattr(self.app, "consumers", ()):
            queue = consumer[0] if isinstance(consumer, tuple) else consumer
            if getattr(queue, "name", None) == name:
                return "queue", type_label(getattr(queue, "type", ""))
        return "queue", ""

    async def queue_infos(self, names: Sequence[str] | None = None) -> list[QueueInfo]:
        """The depths of ``names`` (default: every queue of the app), asked
        of the broker together."""
        names = list(names if names is not None else self.app.queue_names())
        stats = await asyncio.gather(*(self.broker.stats(name) for name in names))
        out = []
        for name, s in zip(names, stats, strict=True):
            kind, tp = self.kind(name)
            out.append(QueueInfo(name, kind, tp, s.ready, s.in_flight, s.delayed, s.dead))
        return out

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetterOut]:
        out = []
        for d in await self.broker.dead_letters(name, limit):
            info = DeadLetterInfo.of(d)
            text, b64 = body_text(info.body)
            out.append(
                DeadLetterOut(
                    info.id,
                    info.reason,
                    info.delivery_count,
                    info.dead_at,
                    {k: v for k, v in info.headers.items()},
                    text,
                    b64,
                )
            )
        return out

    async def requeue(self, name: str, ids: Sequence[str] | None) -> int:
        return await self.broker.requeue(name, ids)

    async def purge(self, name: str, ids: Sequence[str] | None) -> int:
        return await self.broker.purge(name, ids)
