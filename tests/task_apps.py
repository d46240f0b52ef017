"""The apps the kew.task tests run on: a queue URL for each kind of broker
(memory, SQLite, the machine's Redis and RabbitMQ), an :class:`App` on it
whose queues are deleted afterwards, made by one fixture factory so that
each test module says only which brokers, which lease and which names; and
a task's final record."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.task import App, SqliteTaskStore, TaskRecord
from kew.testing.util import port_open, require, wait_for

#: Every kind of broker the task tests run on.
EVERY = ("memory", "sqlite", "redis", "rabbitmq")


def suffix() -> str:
    """A random suffix for queue names (tests share the machine's brokers)."""
    return os.urandom(4).hex()


def broker_url(kind: str, tmp_path: Path, lease: int = 2) -> str:
    """The URL of a ``kind`` broker (one of :data:`EVERY`); Redis and
    RabbitMQ are the machine's (skipped if down, required under CI)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/q.sqlite3?lease={lease}"
    if kind == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        return f"redis://127.0.0.1:6379/0?lease={lease}"
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672/"


def app_on(url: str, tmp_path: Path, events: str, name: str | None = None) -> Iterator[App]:
    """An App on ``url`` (its task store a SQLite file in ``tmp_path``, its
    events queue ``events`` with a random suffix), closed and its queues
    deleted afterwards (on memory:// they go with the process)."""
    a = App(
        url,
        **({} if name is None else {"name": name}),
        store=SqliteTaskStore(tmp_path / "tasks.sqlite3"),
        events_queue=f"{events}-{suffix()}",
    )
    yield a
    names = a.queue_names()
    a.close()
    if url.startswith("memory"):
        return
    c = kew.connect(url)
    try:
        for queue in names:
            c.delete(queue)
    finally:
        c.close()


def app_fixture(
    kinds: Sequence[str] = EVERY, *, lease: int = 2, events: str = "test.events", name: str = ""
) -> Any:
    """A pytest fixture (named by the module attribute it is assigned to)
    giving an :func:`app_on` for each of ``kinds``; ``name``: the app's
    name, with a random suffix (the default name if empty)."""

    def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[App]:
        url = broker_url(request.param, tmp_path, lease)
        yield from app_on(url, tmp_path, events, f"{name}-{suffix()}" if name else None)

    return pytest.fixture(params=list(kinds))(app)


def final(app: App, task_id: str, timeout: float = 30) -> TaskRecord:
    """The task's record once it ended (succeeded, failed or cancelled)."""

    def ended() -> TaskRecord | None:
        r = app.status(task_id)
        return r if r is not None and r.final else None

    r = wait_for(ended, timeout, what=f"task {task_id} to end")
    assert r is not None
    return r
