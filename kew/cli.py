"""The ``kew`` command: run workers, send tasks, look at queues, dead letters and tasks.

    kew worker myservice.tasks:app --concurrency 8
    kew send --app myservice.tasks:app thumbnails '{"image_id": 1}'
    kew queues --app myservice.tasks:app
    kew dead list thumbnails --app myservice.tasks:app
    kew task 3f2a... --follow

``MODULE:APP`` names a :class:`kew.task.App` like uvicorn does: a module
(``pkg.mod``) or a file path (``svc/tasks.py``), then ``:`` and the
attribute (``app`` when left out).  Where no app is given, ``--url`` (or
``$KEW_URL``, else the SQLite default) says which broker to look at.

Every mistake (a bad ``MODULE:APP``, URL or JSON body, an unreachable
broker) is one line on stderr and exit code 2; never a traceback, never a
password (connector URLs are redacted).  See docs/cli.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from kew.connect import install_hint
from kew.qchan.spi import Browser, Connector, KewError
from kew.qchan.spi.urls import redact

#: Where ``kew task`` reads task records when neither --app nor --store is
#: given (the App's default store).
DEFAULT_STORE = "sqlite:///kew-tasks.sqlite3"

#: Commands that live in optional extras, imported only when used:
#: name -> ("module:attribute" of a click command, the extra that installs it).
#: The web helper's ``kew serve`` is registered here.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("kew.web.cli:serve", "web", "Serve the REST API and web pages of MODULE:APP."),
}


class CliError(click.ClickException):
    """A user's mistake or an unreachable broker: one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"kew: error: {self.format_message()}", err=True)


def fail(message: str) -> NoReturn:
    raise CliError(message)


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
        fail(f"{prefix}{_one_line(e)}")
    except (OSError, ValueError, LookupError, TypeError) as e:
        fail(f"{prefix}{type(e).__name__}: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


# -- loading an app --------------------------------------------------------------


def load_app(spec: str) -> Any:
    """The object ``spec`` (``module:attr`` or ``path.py:attr``) names."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part:  # no colon: the whole thing is the module, attribute "app"
        module_part, attr = spec, "app"
    if not module_part or not attr:
        fail(f"bad MODULE:APP {spec!r}: expected e.g. 'myservice.tasks:app'")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            fail(f"cannot load {spec!r}: no file {module_part}")
        name = f"kew_app_{path.stem}"
        sys.path.insert(0, str(path.resolve().parent))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            fail(f"cannot load {spec!r}: {module_part} is not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        with _import_errors(spec):
            loader_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        with _import_errors(spec):
            module = importlib.import_module(module_part)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            fail(f"cannot load {spec!r}: module {module_part!r} has no attribute {attr!r}")
    if callable(obj) and not hasattr(obj, "queue_names"):
        with _import_errors(spec):
            obj = obj()  # an app factory
    if not hasattr(obj, "queue_names") or not hasattr(obj, "connector"):
        fail(f"{spec!r} is a {type(obj).__name__}, not a kew.task.App")
    return obj


@contextmanager
def _import_errors(spec: str) -> Iterator[None]:
    try:
        yield
    except ModuleNotFoundError as e:
        fail(f"cannot load {spec!r}: no module named {e.name!r}")
    except KewError as e:
        fail(f"cannot load {spec!r}: {_one_line(e)}")
    except SyntaxError as e:
        fail(f"cannot load {spec!r}: syntax error in {e.filename} line {e.lineno}")
    except Exception as e:
        fail(f"cannot load {spec!r}: {type(e).__name__}: {_one_line(e)}")


def _connect(url: str | None) -> Connector:
    import kew
    from kew.connect import resolve_url

    with clear_errors(f"cannot connect to {redact(resolve_url(url))}"):
        return kew.connect(url)


def _target(app_spec: str | None, url: str | None) -> tuple[Any, Connector]:
    """(app or None, connector) from --app / --url."""
    if app_spec:
        app = load_app(app_spec)
        return app, app.connector
    return None, _connect(url)


def _check_queue(app: Any, queue: str) -> None:
    if app is not None and queue not in app.queue_names():
        names = ", ".join(app.queue_names()) or "none"
        fail(f"the app declares no queue {queue!r} (its queues: {names})")


# -- tables ---------------------------------------------------------------------


def _fancy() -> bool:
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return False
    return importlib.util.find_spec("rich") is not None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A readable table: rich on a terminal, aligned plain text otherwise
    (so that scripts and tests can read it)."""
    cells = [[_cell(v) for v in row] for row in rows]
    if _fancy():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or None)
        for i, h in enumerate(headers):
            right = bool(cells) and all(_is_number(r[i]) for r in cells)
            table.add_column(h, justify="right" if right else "left")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    if title:
        click.echo(title)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    click.echo(fmt(list(headers)))
    click.echo(fmt(["-" * w for w in widths]))
    for row in cells:
        click.echo(fmt(row))


def _cell(v: object) -> str:
    if v is None:
        return "-"
    return str(v)


def _is_number(s: str) -> bool:
    return s.lstrip("-").isdigit() or s in ("?", "-")


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _count(n: int) -> str:
    return "?" if n < 0 else str(n)


# -- the command group ------------------------------------------------------------


class KewGroup(click.Group):
    """Commands, plus those of optional extras imported when first used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        target, extra, help_text = LAZY_COMMANDS[cmd_name]
        module_name, _, attr = target.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            return _missing_extra(cmd_name, extra, help_text, str(e))
        if not isinstance(found, click.Command):
            raise TypeError(f"{target} is not a click command")
        return found


def _missing_extra(name: str, extra: str, help_text: str, why: str) -> click.Command:
    @click.command(
        name,
        help=f"{help_text}  (Needs: {install_hint(extra)}.)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=True,
    )
    def missing() -> None:
        fail(f"'kew {name}' is not available ({why}); install it with: {install_hint(extra)}")

    return missing


@click.group(cls=KewGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kew", prog_name="kew")
def main() -> None:
    """kew: typed task queues over pluggable brokers.

    MODULE:APP names a kew.task.App (``pkg.module:app`` or ``path/file.py:app``).
    Without an app, --url (default $KEW_URL, else sqlite:///kew.sqlite3) names
    the broker.
    """


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


# -- worker, recorder ----------------------------------------------------------------


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Tasks run at once (and taken from the broker ahead: prefetch = this).",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Deliveries held per task queue (fetched ahead or running); default and minimum: "
    "--concurrency.",
)
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    metavar="QUEUE",
    help="Only these task queues (repeat the option); default: all of the app's.",
)
@click.option(
    "--record/--no-record",
    default=False,
    show_default=True,
    help="Also consume task events into the app's store (a recorder in this process).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on this port.",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    metavar="ADDR",
    help="Address the metrics port listens on (0.0.0.0 for every interface).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT: time to finish running tasks before handing them back.",
)
@click.option(
    "--health-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="PATH",
    help="A file that exists while the worker is healthy (every consumer fetching, none "
    "stalled): touched every 2 s, removed when not healthy and on exit. For a liveness "
    "probe such as `test -f PATH`.",
)
@click.option(
    "--stall-after",
    type=click.FloatRange(min=0.1),
    envvar="KEW_STALL_AFTER",
    default=None,
    metavar="SECONDS",
    help="Advanced: a consumer whose fetches have failed (or that has left work waiting "
    "undelivered) for this long makes the worker unhealthy. Default 60 ($KEW_STALL_AFTER).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    envvar="KEW_LOG_LEVEL",
    default="info",
    show_default=True,
    help="Logging level (stderr).",
)
def worker(
    app_spec: str,
    concurrency: int,
    prefetch: int | None,
    queues: tuple[str, ...],
    record: bool,
    metrics_port: int | None,
    metrics_addr: str,
    grace: float,
    health_file: str | None,
    stall_after: float | None,
    log_level: str,
) -> None:
    """Run the task queues of MODULE:APP until SIGTERM or SIGINT.

    A first signal stops taking work and lets running tasks finish within
    --grace seconds (then hands them back); a second hands everything back
    and exits at once.  Exit code 0 after a graceful stop; 1 when a
    consumer failed for good (it can never fetch again: the worker stops
    gracefully, and says which queue and why on stderr).
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if prefetch is not None and prefetch < concurrency:
        raise click.BadParameter(
            f"{prefetch} is less than --concurrency ({concurrency})", param_hint="--prefetch"
        )
    app = load_app(app_spec)
    if metrics_port is not None:
        from kew.task import metrics

        with clear_errors("metrics"):
            metrics.install(app)
            metrics.serve(metrics_port, addr=metrics_addr)
    from kew.task.worker import WorkerFailed

    with clear_errors():
        w = app.worker(
            concurrency=concurrency, queues=list(queues) or None, record=record, prefetch=prefetch
        )
        _set_grace(w, grace)
        w.health_file = Path(health_file) if health_file is not None else None
        w.stall_after = stall_after
        try:
            w.run()
        except WorkerFailed as e:
            with suppress(Exception):
                app.close()
            raise WorkerExit(_one_line(e)) from None
    app.close()


class WorkerExit(CliError):
    """The worker stopped because a consumer failed for good: one line,
    exit code 1 (a supervisor restarts it)."""

    exit_code = 1


def _set_grace(w: Any, grace: float) -> None:
    if hasattr(w, "grace"):
        w.grace = grace


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
def recorder(app_spec: str) -> None:
    """Consume MODULE:APP's task events into its store until SIGTERM/SIGINT.

    Run one (or a few) of these so that `kew task`, the REST API and anyone
    else can read task status and output, whichever machine ran the task.
    """
    app = load_app(app_spec)
    with clear_errors():
        sub = app.recorder()
    stop = threading.Event()
    _on_signals(lambda: stop.set())
    click.echo(f"kew recorder: {app.name} -> {_store_label(app)}", err=True)
    while not stop.wait(1.0):
        pass
    sub.stop()
    app.close()


def _store_label(app: Any) -> str:
    store = getattr(app, "store", None)
    return str(getattr(store, "url", None) or type(store).__name__)


def _on_signals(handler: Callable[[], None]) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# -- send ----------------------------------------------------------------------------


@main.command()
@app_option
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Deliver after this many seconds.",
)
@click.option(
    "--id",
    "task_id",
    default=None,
    metavar="ID",
    help="The task id to use (default: a new random one).",
)
@click.argument("queue")
@click.argument("body", metavar="JSON")
def send(
    app_spec: str | None, delay: float | None, task_id: str | None, queue: str, body: str
) -> None:
    """Submit a task: JSON (or '-' to read it from stdin) on QUEUE of the app.

    The body is validated against the queue's type first: a body that does
    not fit is refused with the reason (exit code 2) and nothing is sent.
    Prints the task id.
    """
    if not app_spec:
        fail("kew send needs --app MODULE:APP (or $KEW_APP): the app says the queue's type")
    app = load_app(app_spec)
    tq = app.queues.get(queue)
    if tq is None:
        fail(f"the app has no task queue {queue!r} (its task queues: {', '.join(app.queues)})")
    raw = sys.stdin.buffer.read() if body == "-" else body.encode()
    from kew.qchan.codec import DecodeError

    try:
        data = tq.decode_json(raw)
    except DecodeError as e:
        fail(f"invalid task for queue {queue!r} ({tq.type.__name__}): {_one_line(e)}")
    with clear_errors(f"cannot send to {queue!r}"):
        tid = tq.submit(data, delay=delay, id=task_id)
    click.echo(tid)
    app.close()


# -- queues ----------------------------------------------------------------------------


@main.command()
@app_option
@url_option
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    metavar="QUEUE",
    help="Queues to show (repeat); default: every queue the app declares.",
)
def queues(app_spec: str | None, url: str | None, queues: tuple[str, ...]) -> None:
    """Depth of queues: ready, in flight, delayed, dead letters.

    With --app, the app's queues (task queues, outcomes, events, extra
    consumers); with --url, the queues named by --queue.  A count a broker
    cannot tell shows as '?'.
    """
    app, connector = _target(app_spec, url)
    names = list(queues) or (app.queue_names() if app is not None else [])
    if not names:
        fail("name the queues with --queue (a broker URL alone does not list its queues)")
    rows = []
    for name in names:
        with clear_errors(f"queue {name!r}"):
            b = connector.browser(name)
            try:
                s = b.stats()
            finally:
                b.close()
        rows.append([name, _count(s.ready), _count(s.in_flight), _count(s.delayed), _count(s.dead)])
    print_table(
        ["queue", "ready", "in flight", "delayed", "dead"], rows, title=f"{redact(connector.url)}"
    )
    _close(app, connector)


def _close(app: Any, connector: Connector) -> None:
    try:
        if app is not None:
            app.close()
        else:
            connector.close()
    except Exception:  # closing is best effort at exit
        pass


# -- dead letters ----------------------------------------------------------------------


@main.group()
def dead() -> None:
    """Dead letters of a queue: list, show, requeue, purge."""


@contextmanager
def _dead_browser(app_spec: str | None, url: str | None, queue: str) -> Iterator[Browser]:
    app, connector = _target(app_spec, url)
    _check_queue(app, queue)
    with clear_errors(f"queue {queue!r}"):
        b = connector.browser(queue)
    try:
        with clear_errors(f"queue {queue!r}"):
            yield b
    finally:
        b.close()
        _close(app, connector)


@dead.command("list")
@app_option
@url_option
@click.option("-n", "--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.argument("queue")
def dead_list(app_spec: str | None, url: str | None, limit: int, queue: str) -> None:
    """List QUEUE's dead letters: id, deliveries, when, the reason's first line."""
    with _dead_browser(app_spec, url, queue) as b:
        letters = b.dead_letters(limit)
        total = b.stats().dead
    rows = [
        [d.message.id, d.delivery_count, fmt_time(d.dead_at), _first_line(d.reason, 80)]
        for d in letters
    ]
    print_table(["id", "count", "dead at", "reason"], rows)
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(len(rows))
    click.echo(f"{shown} dead letter{'s' if len(rows) != 1 else ''} on {queue}", err=True)


def _first_line(text: str, width: int) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= width else line[: width - 1] + "…"


@dead.command("show")
@app_option
@url_option
@click.argument("queue")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
def dead_show(app_spec: str | None, url: str | None, queue: str, ids: tuple[str, ...]) -> None:
    """Show dead letters in full: reason, headers and body."""
    with _dead_browser(app_spec, url, queue) as b:
        found = {d.message.id: d for d in b.dead_letters(100_000) if d.message.id in ids}
    missing = [i for i in ids if i not in found]
    for i in ids:
        d = found.get(i)
        if d is None:
            continue
        click.echo(f"id:         {d.message.id}")
        click.echo(f"queue:      {queue}")
        click.echo(f"deliveries: {d.delivery_count}")
        click.echo(f"dead at:    {fmt_time(d.dead_at)}")
        click.echo("headers:")
        for k, v in sorted(d.message.headers.items()):
            click.echo(f"  {k}: {v}")
        click.echo("reason:")
        for line in d.reason.rstrip().splitlines() or [""]:
            click.echo(f"  {line}")
        click.echo("body:")
        click.echo(d.message.body.decode("utf-8", errors="replace"))
        click.echo("")
    if missing:
        fail(f"no dead letter {', '.join(missing)} on {queue!r}")


def _ids_or_all(ids: tuple[str, ...], all_: bool, verb: str) -> list[str] | None:
    if all_ and ids:
        fail(f"give ids or --all to {verb}, not both")
    if not all_ and not ids:
        fail(f"say which dead letters to {verb}: their ids, or --all")
    return None if all_ else list(ids)


def _by_ids_or_all(fn: Callable[..., None]) -> Callable[..., None]:
    """The options of a command on some dead letters of a queue: QUEUE,
    their ids or --all, and --app / --url."""
    fn = click.argument("ids", nargs=-1, metavar="[ID]...")(fn)
    fn = click.argument("queue")(fn)
    fn = click.option("--all", "all_", is_flag=True, help="Every dead letter of the queue.")(fn)
    return app_option(url_option(fn))


def _settle_dead(
    app_spec: str | None,
    url: str | None,
    all_: bool,
    queue: str,
    ids: tuple[str, ...],
    verb: str,
    done: str,
    act: Callable[[Browser, list[str] | None], int],
) -> None:
    """``act`` on the dead letters of ``queue`` given (ids or all); print
    how many were ``done``, and fail if some ids were not dead letters."""
    which = _ids_or_all(ids, all_, verb)
    with _dead_browser(app_spec, url, queue) as b:
        n = act(b, which)
    click.echo(f"{done} {n} dead letter{'s' if n != 1 else ''} on {queue}")
    if which is not None and n < len(which):
        fail(f"{len(which) - n} of the ids given were not dead letters of {queue!r}")


@dead.command("requeue")
@_by_ids_or_all
def dead_requeue(
    app_spec: str | None, url: str | None, all_: bool, queue: str, ids: tuple[str, ...]
) -> None:
    """Put dead letters back on QUEUE (by id, or --all); prints how many."""
    _settle_dead(
        app_spec, url, all_, queue, ids, "requeue", "requeued", lambda b, w: b.requeue_dead(w)
    )


@dead.command("purge")
@_by_ids_or_all
def dead_purge(
    app_spec: str | None, url: str | None, all_: bool, queue: str, ids: tuple[str, ...]
) -> None:
    """Delete dead letters of QUEUE for good (by id, or --all); prints how many."""
    _settle_dead(app_spec, url, all_, queue, ids, "purge", "purged", lambda b, w: b.purge_dead(w))


# -- task status -------------------------------------------------------------------


@main.command()
@app_option
@click.option(
    "--store",
    "store_url",
    envvar="KEW_STORE",
    default=None,
    metavar="URL",
    help=f"Task store URL when no --app is given (default: $KEW_STORE, else {DEFAULT_STORE}).",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Print the output as it comes until the task is final; exit 1 if it failed.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.01),
    default=0.3,
    show_default=True,
    metavar="SECONDS",
    help="How often --follow looks for news.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Give up following after this long (exit 3).",
)
@click.argument("task_id", metavar="ID")
def task(
    app_spec: str | None,
    store_url: str | None,
    follow: bool,
    poll: float,
    timeout: float | None,
    task_id: str,
) -> None:
    """Status of task ID (a table), and its output so far; --follow tails it."""
    store, closer = _open_store(app_spec, store_url)
    try:
        with clear_errors("task store"):
            record = store.get(task_id)
        if record is None and not follow:
            fail(f"no task {task_id!r} in the store (is a recorder running?)")
        if not follow:
            _print_record(record)
            with clear_errors("task store"):
                text, _ = store.output(task_id, 0)
            if text:
                click.echo("output:")
                click.echo(text, nl=not text.endswith("\n"))
            return
        _follow(store, task_id, poll, timeout)
    finally:
        closer()


def _open_store(app_spec: str | None, store_url: str | None) -> tuple[Any, Callable[[], None]]:
    if app_spec:
        app = load_app(app_spec)
        return app.store, app.close
    from kew.task.store import open_store

    url = store_url or DEFAULT_STORE
    with clear_errors(f"cannot open the task store {redact(url)}"):
        store = open_store(url)
    return store, store.close


def _print_record(r: Any) -> None:
    rows = [
        ["id", r.id],
        ["queue", r.queue],
        ["status", r.status],
        ["attempt", r.attempt],
        ["created", fmt_time(r.created_at)],
        ["started", fmt_time(r.started_at)],
        ["finished", fmt_time(r.finished_at)],
        ["updated", fmt_time(r.updated_at)],
    ]
    if r.next_at:
        rows.append(["next attempt", fmt_time(r.next_at)])
    if r.worker:
        rows.append(["worker", r.worker])
    if r.last_error:
        rows.append(["last error", _first_line(r.last_error, 200)])
    print_table(["field", "value"], rows)


def _follow(store: Any, task_id: str, poll: float, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    offset = 0
    status = ""
    stop = threading.Event()
    _on_signals(stop.set)
    while True:
        with clear_errors("task store"):
            record = store.get(task_id)
            text, offset_next = store.output(task_id, offset)
        if record is not None and record.status != status and not record.final:
            status = record.status
            line = f"[kew] task {task_id}: {status}"
            if record.attempt:
                line += f" (attempt {record.attempt})"
            if status == "retry-scheduled" and record.next_at:
                line += f", next attempt at {fmt_time(record.next_at)}"
            click.echo(line, err=True)
        if text:
            click.echo(text, nl=False)
            sys.stdout.flush()
        offset = offset_next
        if record is not None and record.final:
            # The last output may land just after the final status: read once more.
            with clear_errors("task store"):
                text, offset = store.output(task_id, offset)
            if text:
                click.echo(text, nl=False)
            sys.stdout.flush()
            line = f"[kew] task {task_id}: {record.status} (attempt {record.attempt})"
            click.echo(line, err=True)
            if record.status == "failed":
                if record.last_error:
                    click.echo(f"[kew] error: {_first_line(record.last_error, 500)}", err=True)
                sys.exit(1)
            return
        if deadline is not None and time.monotonic() > deadline:
            click.echo(f"[kew] gave up following {task_id} after {timeout}s", err=True)
            sys.exit(3)
        if stop.wait(poll):
            sys.exit(130)


if __name__ == "__main__":
    main()
