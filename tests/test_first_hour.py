"""What a new user meets in the first hour (the first-hour issue): typed
sends checked on the producer's end, async handlers refused where they would
never be awaited, failures in the log, and no I/O when a queue is made."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import kew
from kew.core.msg import RepeatAction
from kew.qchan import InvalidValue
from kew.qchan.spi import Connector
from kew.testing.util import wait_for


class Thumbnail(msgspec.Struct):
    image_id: int
    size: int = 256


class Other(msgspec.Struct):
    name: str


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connector]:
    c = kew.connect(f"sqlite:///{tmp_path}/first.sqlite3")
    yield c
    c.close()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("hello", "Expected `object`, got `str`"),
        (None, "Expected `object`, got `null`"),
        (Other("x"), "Object missing required field `image_id`"),
        (Thumbnail(image_id="42"), "Expected `int`, got `str` - at `$.image_id`"),  # type: ignore[arg-type]
        (object(), "Encoding objects of type object is unsupported"),
    ],
)
def test_send_checks_the_value_against_the_queue_type(
    conn: Connector, value: object, words: str
) -> None:
    q = kew.Queue(conn, "thumbs", Thumbnail)
    with pytest.raises(InvalidValue) as e:
        q.send(value)  # type: ignore[arg-type]
    assert words in str(e.value) and "'thumbs'" in str(e.value)
    assert isinstance(e.value, kew.KewError)
    with pytest.raises(InvalidValue):
        q.send_many([Thumbnail(1), value])  # type: ignore[list-item]
    assert q.browser().stats().ready == 0  # nothing stored, not even the good one


def test_async_handlers_are_refused_at_declaration(conn: Connector) -> None:
    q = kew.Queue(conn, "thumbs", Thumbnail)

    async def render(t: Thumbnail) -> None: ...

    class Renderer:
        async def __call__(self, t: Thumbnail) -> None: ...

    for handler in (render, Renderer()):
        with pytest.raises(TypeError, match="async function"):
            q.sink(handler)
        with pytest.raises(TypeError, match="async function"):
            q.repeat_sink(handler, [1], print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="render"):
        q.sink(render)


def test_a_failing_handler_is_logged_once_at_error(
    conn: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    q = kew.Queue(conn, "thumbs", Thumbnail)
    mid = q.post(Thumbnail(7))

    def fail(t: Thumbnail) -> None:
        raise ValueError(f"cannot render {t.image_id}")

    with caplog.at_level(logging.INFO, logger="kew"), q.sink(fail):
        wait_for(lambda: q.dead.list(), 10, what="the dead letter")
    lines = [r for r in caplog.records if mid in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    (line,) = lines
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert "thumbs" in text and "ValueError: cannot render 7" in text and "delivery 1" in text
    assert line.exc_info is None  # the traceback only at DEBUG


def test_repeat_sink_logs_each_attempt_and_the_last_one_at_error(
    conn: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    q = kew.Queue(conn, "thumbs", Thumbnail)
    mid = q.post(Thumbnail(7))
    exceeded = threading.Event()

    def fail(t: Thumbnail) -> RepeatAction:
        raise RuntimeError("OMERO busy")

    with (
        caplog.at_level(logging.INFO, logger="kew"),
        q.repeat_sink(fail, [0.05, 0.05], lambda t: exceeded.set()),
    ):
        wait_for(exceeded.is_set, 15, what="on_exceeded")
    lines = [r for r in caplog.records if mid in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert "attempt 1 of 3" in lines[0].getMessage()
    assert "next attempt at" in lines[0].getMessage()
    assert "no attempts left" in lines[2].getMessage()
    assert not any("will repeat" in r.getMessage() for r in caplog.records)


def test_connectors_are_context_managers_and_ping_checks_now(tmp_path: Path) -> None:
    with kew.connect(f"sqlite:///{tmp_path}/ctx.sqlite3") as conn:
        assert kew.ping(conn) >= 0
        kew.Queue(conn, "ctx", int).send(1)
    with pytest.raises(kew.KewError, match="closed"):
        kew.Queue(conn, "ctx2", int).send(1)


def test_nothing_talks_to_a_broker_before_the_first_operation() -> None:
    """A closed port: connect(), Queue(), App() and a task declaration return
    at once; ping() (or the first operation) is what fails, with kew's type."""
    import time

    from kew.task import App
    from kew.testing.util import free_port

    url = f"redis://127.0.0.1:{free_port()}/0?retries=0"
    start = time.monotonic()
    conn = kew.connect(url)
    q = kew.Queue(conn, "nothing-yet", Thumbnail)
    app = App(url, name="first-hour", store="memory://")

    @app.task
    def render(t: Thumbnail) -> None: ...

    assert time.monotonic() - start < 1.0
    with pytest.raises(kew.BrokerUnavailable):
        kew.ping(conn)
    with pytest.raises(kew.BrokerUnavailable):
        q.send(Thumbnail(1))
    app.close()
    conn.close()
