"""What a worker logs about its tasks (the first-hour issue): a failed
attempt that will be retried at WARNING (queue, task id, attempt n of m,
the exception's type and message, when the next attempt is due), a task
that fails for good at ERROR, a Retry raised on purpose at INFO; tracebacks
only at DEBUG; never the task's value.  Also: async handlers refused where
they are declared.  A real SQLite-backed app and worker throughout."""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

import kew
from kew.cli import main
from kew.qchan.spi import Message
from kew.task import App, Intervals, Permanent, Retry, TaskRecord
from kew.testing.util import wait_for


class Render(msgspec.Struct, frozen=True):
    image_id: int
    session_key: str = ""  # a secret: never in a log line


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = App(f"sqlite:///{tmp_path}/q.sqlite3", store=f"sqlite:///{tmp_path}/tasks.sqlite3")
    yield a
    a.close()


def run_until_final(app: App, task_ids: list[str]) -> list[TaskRecord]:
    """Run a worker (recording) until every task is final."""

    def final() -> list[TaskRecord]:
        records = [app.status(t) for t in task_ids]
        done = [r for r in records if r is not None and r.status in ("succeeded", "failed")]
        return done if len(done) == len(task_ids) else []

    w = app.worker(concurrency=2, record=True).start()
    try:
        return wait_for(final, 30, what="the tasks final")
    finally:
        assert w.stop(5)


def lines_of(caplog: pytest.LogCaptureFixture, task_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if task_id in r.getMessage()]


def due_after(record: logging.LogRecord) -> float:
    """Seconds from the log line to the due time it names."""
    m = re.search(r"next attempt at (\S+)$", record.getMessage())
    assert m, record.getMessage()
    return dt.datetime.fromisoformat(m.group(1)).timestamp() - record.created


def test_one_warning_per_failed_attempt_and_one_error_when_they_run_out(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"session-{secrets.token_hex(12)}"

    @app.task(retry=Intervals.of(0.2, 0.2))
    def render(job: Render) -> None:
        raise ValueError(f"cannot render {job.image_id}")

    caplog.set_level(logging.INFO, logger="kew")
    ids = [render.submit(Render(7, secret)), render.submit(Render(8, secret))]
    records = run_until_final(app, ids)
    assert all(r.status == "failed" for r in records)
    for task_id, n in zip(ids, (7, 8), strict=True):
        lines = lines_of(caplog, task_id)
        levels = [r.levelno for r in lines]
        assert levels == [logging.WARNING, logging.WARNING, logging.ERROR], [
            r.getMessage() for r in lines
        ]
        for attempt, line in enumerate(lines[:2], 1):
            text = line.getMessage()
            assert "render" in text and f"attempt {attempt} of 3 failed" in text
            assert f"ValueError: cannot render {n}" in text
            assert 0.1 <= due_after(line) <= 1.0  # the policy's 0.2 s, and a due time
        error = lines[2].getMessage()
        assert "attempt 3 of 3 failed" in error and f"ValueError: cannot render {n}" in error
        assert "no attempts left" in error and "dead letters" in error
        assert all(line.exc_info is None for line in lines)  # tracebacks only at DEBUG
    assert secret not in caplog.text
    assert len(render.queue.dead.list()) == 2


def test_permanent_failure_is_one_error_and_no_warning(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(retry=Intervals.of(0.05, 0.05))
    def doomed(job: Render) -> None:
        raise Permanent(f"image {job.image_id} is gone")

    caplog.set_level(logging.INFO, logger="kew")
    tid = doomed.submit(Render(9))
    (record,) = run_until_final(app, [tid])
    assert record.status == "failed"
    (line,) = lines_of(caplog, tid)
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert "doomed" in text and "attempt 1 of 3 failed (Permanent: image 9 is gone)" in text
    assert "a permanent failure" in text and line.exc_info is None


def test_retry_on_purpose_is_info_with_its_due_time(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(retry=Intervals.of(60))
    def waits(job: Render) -> None:
        from kew.task import current

        if current().attempt == 1:
            raise Retry("OMERO busy", after=0.3)

    caplog.set_level(logging.INFO, logger="kew")
    tid = waits.submit(Render(1))
    (record,) = run_until_final(app, [tid])
    assert record.status == "succeeded"
    (line,) = lines_of(caplog, tid)
    assert line.levelno == logging.INFO
    text = line.getMessage()
    assert "attempt 1 of 2 asked to be retried (Retry: OMERO busy)" in text
    assert 0.2 <= due_after(line) <= 1.0  # Retry(after=0.3), not the policy's 60 s


def test_a_policy_without_max_attempts_says_the_attempt_only(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    class Twice:
        def delay(self, attempt: int) -> float | None:
            return 0.05 if attempt < 2 else None

    def flaky(job: Render) -> None:
        raise OSError("disk full")

    tq = app.task_queue("flaky", Render, flaky, retry=Twice())
    caplog.set_level(logging.INFO, logger="kew")
    tid = tq.submit(Render(2))
    run_until_final(app, [tid])
    lines = lines_of(caplog, tid)
    assert [r.levelno for r in lines] == [logging.WARNING, logging.ERROR]
    assert "attempt 1 failed (OSError: disk full)" in lines[0].getMessage()
    assert "attempt 2 failed (OSError: disk full)" in lines[1].getMessage()


def test_tracebacks_at_debug_and_never_a_secret(app: App, caplog: pytest.LogCaptureFixture) -> None:
    """Not the task's value; and a secret-looking ``password=...`` in an
    exception's message (or a URL's password) is scrubbed, traceback too."""
    secret = f"session-{secrets.token_hex(12)}"
    password = f"pw-{secrets.token_hex(12)}"

    @app.task(retry=Intervals.of(0.05))
    def leaky(job: Render) -> None:
        raise KeyError(f"login to amqp://kew:{password}@mq/ failed; password={password}")

    caplog.set_level(logging.DEBUG)
    tid = leaky.submit(Render(3, secret))
    run_until_final(app, [tid])
    lines = [r for r in lines_of(caplog, tid) if r.levelno >= logging.WARNING]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.ERROR]
    for line in lines:
        text = line.getMessage()
        assert "login to amqp://kew:***@mq/ failed; password=***" in text
        assert "Traceback (most recent call last)" in text  # DEBUG is on
        assert text.rstrip().endswith("password=***'")  # the exception's own line
    assert secret not in caplog.text and password not in caplog.text
    assert all(r.exc_info is None for r in caplog.records if tid in r.getMessage())


def test_no_traceback_above_debug(app: App, caplog: pytest.LogCaptureFixture) -> None:
    @app.task(retry=Intervals.of(0.05))
    def broken(job: Render) -> None:
        raise KeyError("thumbnail")

    caplog.set_level(logging.INFO)
    tid = broken.submit(Render(4))
    run_until_final(app, [tid])
    lines = lines_of(caplog, tid)
    assert [r.levelno for r in lines] == [logging.WARNING, logging.ERROR]
    assert all("Traceback" not in r.getMessage() and r.exc_info is None for r in lines)
    assert "(KeyError: 'thumbnail')" in lines[0].getMessage()


def test_a_body_that_does_not_decode_is_an_error_and_a_failed_task(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    tq = app.task_queue("strict", Render, lambda job: None)
    tq.queue.producer.send(Message("not-a-render", b'{"image_id": "x"}', {}))
    caplog.set_level(logging.INFO, logger="kew")
    (record,) = run_until_final(app, ["not-a-render"])
    assert record.status == "failed" and "cannot decode as Render" in record.last_error
    errors = [r for r in lines_of(caplog, "not-a-render") if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "strict" in errors[0].getMessage()
    assert "Expected `int`, got `str`" in errors[0].getMessage()
    (dead,) = tq.queue.dead.list()
    assert dead.id == "not-a-render" and "cannot decode as Render" in dead.reason


# -- async handlers: refused where a plain callable is run --------------------------


async def render_async(job: Render) -> None: ...


class AsyncRenderer:
    async def __call__(self, job: Render) -> None: ...


def plain(job: Render) -> None: ...


@pytest.mark.parametrize(
    ("declare", "name"),
    [
        (lambda app, fn: app.command_task("q", Render, fn), "render_async"),
        (lambda app, fn: app.consumer(kew.Queue(app.connector, "c", Render), fn), "render_async"),
    ],
    ids=["command_task", "consumer"],
)
def test_async_handlers_are_refused_at_declaration(
    app: App, declare: Callable[[App, object], object], name: str
) -> None:
    for fn, label in ((render_async, name), (AsyncRenderer(), "AsyncRenderer")):
        with pytest.raises(TypeError, match="async function") as e:
            declare(app, fn)
        assert label in str(e.value)
    assert not app.queues and not app.consumers  # nothing declared


def test_task_handlers_may_be_async(app: App) -> None:
    """A task handler (and its exceeded handler) may be an ``async def``: it
    runs on the app's event loop (tests/test_task_async.py runs them)."""
    tq = app.task()(render_async)
    other = app.task_queue("q", Render, AsyncRenderer(), on_exceeded=render_async)
    assert tq.is_async and other.is_async
    assert set(app.queues) == {"render_async", "q"}


def test_a_plain_handler_is_still_welcome(app: App) -> None:
    tq = app.task()(plain)
    app.consumer(kew.Queue(app.connector, "c", Render), plain)
    assert app.queues == {"plain": tq} and len(app.consumers) == 1


# -- the recorder ----------------------------------------------------------------------


def test_the_recorder_has_no_concurrency_option() -> None:
    """It had one that did nothing: one batch loop applies what a store can take."""
    result = CliRunner().invoke(main, ["recorder", "--concurrency", "2", "x:app"])
    assert result.exit_code == 2
    assert re.search(r"No such option:? '?--concurrency", result.output), result.output
