"""docs/wire-format.md's examples, run as a program in another language
would run them: with the raw clients, against real brokers; a kew consumer
must then get the message the page says it gets."""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kew
from kew.qchan.spi import Connector, Message
from kew.testing.util import port_open, require, wait_for

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"


class Thumbnail(msgspec.Struct):
    image_id: int


def _examples() -> dict[str, str]:
    found = re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    return dict(found)


def _run(name: str, queue: str, **names: Any) -> None:
    code = _examples()[name].replace("thumbnails", queue)
    exec(compile(code, f"docs/wire-format.md#{name}", "exec"), dict(names))


def _consume_one(conn: Connector, queue: str, **options: Any) -> Thumbnail:
    q = kew.Queue(conn, queue, Thumbnail, **options)
    got: list[Thumbnail] = []
    lock = threading.Lock()

    def add(t: Thumbnail) -> None:
        with lock:
            got.append(t)

    with q.sink(add):
        wait_for(lambda: got, 15, what=f"the example's message on {queue}")
    assert q.dead.list() == []
    return got[0]


@pytest.fixture
def queue() -> str:
    return f"wire-doc-{os.urandom(4).hex()}"


def test_every_broker_has_an_example() -> None:
    assert set(_examples()) >= {"sqlite", "redis", "rabbitmq", "stomp", "encrypted"}


def test_sqlite_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue: str) -> None:
    monkeypatch.chdir(tmp_path)
    conn = kew.connect("sqlite:///kew.sqlite3")  # kew makes the file and its tables
    try:
        _run("sqlite", queue)
        assert _consume_one(conn, queue) == Thumbnail(1)
    finally:
        conn.close()


def test_redis_example(queue: str) -> None:
    require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
    conn = kew.connect("redis://127.0.0.1:6379/0")
    try:
        _run("redis", queue)
        assert _consume_one(conn, queue) == Thumbnail(1)
    finally:
        conn.delete(queue)
        conn.close()


def test_rabbitmq_example(queue: str) -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    conn = kew.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        conn.declare(queue)  # kew declares its queues; the page says how to declare one
        _run("rabbitmq", queue)
        assert _consume_one(conn, queue) == Thumbnail(1)
    finally:
        conn.delete(queue)
        conn.close()


@pytest.fixture
def stomp_url() -> Iterator[str]:
    from tests.brokers.stomp_server import require_rabbitmq_stomp

    require_rabbitmq_stomp()
    yield "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq"


def test_stomp_example_types_the_listed_integers(stomp_url: str, queue: str) -> None:
    conn = kew.connect(stomp_url)
    try:
        conn.declare(queue)
        _run("stomp", queue)
        consumer = conn.consumer(queue, 1)
        try:
            got = wait_for(lambda: consumer.fetch(1, 0.5), 15, what="the STOMP example's message")
            headers = got[0].message.headers
            assert headers["attempt"] == 1 and isinstance(headers["kew-sent-at"], int)
            assert msgspec.json.decode(got[0].message.body, type=Thumbnail) == Thumbnail(1)
            consumer.ack(got[0])
        finally:
            consumer.close()
    finally:
        conn.delete(queue)
        conn.close()


def test_encrypted_example_is_read_by_an_encrypted_queue(queue: str) -> None:
    pytest.importorskip("cryptography")
    key = base64.b64encode(os.urandom(32)).decode()
    names: dict[str, Any] = {"KEY_B64": key}
    code = _examples()["encrypted"].replace("thumbnails", queue)
    exec(compile(code, "docs/wire-format.md#encrypted", "exec"), names)
    conn = kew.connect(f"memory://{queue}")
    try:
        conn.declare(queue)
        headers = {"content-type": "application/kew-encrypted+json"}
        conn.producer(queue).send(Message(os.urandom(16).hex(), names["body"], headers))
        assert _consume_one(conn, queue, encryption_keys=f"k1:{key}") == Thumbnail(1)
    finally:
        conn.close()
