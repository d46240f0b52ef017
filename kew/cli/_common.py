"""What every command shares: one-line errors (exit code 2), the --app,
--url and --json options, connecting to a broker, signals."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import click

from kew.cli._logs import report_error
from kew.qchan.spi import Connector, KewError
from kew.qchan.spi.urls import redact

#: Where ``kew task`` and ``kew tasks`` read task records when neither --app
#: nor --store is given (the App's default store).
DEFAULT_STORE = "sqlite:///kew-tasks.sqlite3"


class CliError(click.ClickException):
    """A user's mistake or an unreachable broker: one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        report_error(self.format_message())


class WorkerExit(CliError):
    """A worker stopped because a consumer failed for good (or its processes
    kept dying): one line, exit code 1 (a supervisor restarts it)."""

    exit_code = 1


def fail(message: str) -> NoReturn:
    raise CliError(message)


def one_line(e: BaseException) -> str:
    """The first line of an exception's text (its type when it has none)."""
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


def describe(e: BaseException) -> str:
    """kew's own errors by their text; others as ``Type: text``."""
    return one_line(e) if isinstance(e, KewError) else f"{type(e).__name__}: {one_line(e)}"


@contextmanager
def clear_errors(what: str = "") -> Iterator[None]:
    """Turn kew's own errors (and OS errors such as a refused connection)
    into one clear line and exit code 2."""
    prefix = f"{what}: " if what else ""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KewError as e:
        fail(f"{prefix}{one_line(e)}")
    except (OSError, ValueError, LookupError, TypeError) as e:
        fail(f"{prefix}{type(e).__name__}: {one_line(e)}")


@contextmanager
def queue_errors(queue: str) -> Iterator[None]:
    """Whatever a broker raises about one queue (RabbitMQ's 404 for a queue
    that does not exist, a Redis key of the wrong type, ...) as one line
    naming the queue, exit code 2; never a traceback."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except Exception as e:
        fail(f"queue {queue!r}: {describe(e)}")


def connect(url: str | None) -> Connector:
    import kew
    from kew.connect import resolve_url

    with clear_errors(f"cannot connect to {redact(resolve_url(url))}"):
        return kew.connect(url)


def target(app_spec: str | None, url: str | None) -> tuple[Any, Connector]:
    """(app or None, connector) from --app / --url."""
    if app_spec:
        from kew.cli._load import load_app

        app = load_app(app_spec)
        return app, app.connector
    return None, connect(url)


def unknown_to_app(app: Any, queue: str) -> str | None:
    """Why ``queue`` is not one of the app's (None when it is, or no app)."""
    if app is None or queue in app.queue_names():
        return None
    names = ", ".join(app.queue_names()) or "none"
    return f"the app declares no queue {queue!r} (its queues: {names})"


def close_quietly(app: Any, connector: Connector | None) -> None:
    try:
        if app is not None:
            app.close()
        elif connector is not None:
            connector.close()
    except Exception:  # closing is best effort at exit
        pass


def on_signals(handler: Callable[[], None]) -> None:
    """Call ``handler`` on SIGTERM and SIGINT (instead of dying)."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


url_option = click.option(
    "--url",
    envvar="KEW_URL",
    default=None,
    metavar="URL",
    help="Broker URL when no --app is given (default: $KEW_URL, else sqlite:///kew.sqlite3).",
)
app_option = click.option(
    "--app",
    "app_spec",
    metavar="MODULE:APP",
    envvar="KEW_APP",
    default=None,
    help="The kew.task.App to use (default: $KEW_APP).",
)
json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON on stdout instead of a table (for scripts).",
)
store_option = click.option(
    "--store",
    "store_url",
    envvar="KEW_STORE",
    default=None,
    metavar="URL",
    help=f"Task store URL when no --app is given (default: $KEW_STORE, else {DEFAULT_STORE}).",
)
