"""``kew send`` (submit a task), ``kew task`` (one task, ``--follow``),
``kew task cancel`` (cancel one) and ``kew tasks`` (search the task store
with the REST API's filters)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, get_args

import click

from kew.cli._common import (
    DEFAULT_STORE,
    app_option,
    clear_errors,
    fail,
    json_option,
    on_signals,
    one_line,
    store_option,
)
from kew.cli._load import load_app
from kew.cli._output import echo_json, first_line, fmt_time, print_table
from kew.qchan.spi.urls import redact
from kew.task.model import TaskStatus

#: Seconds ``kew task ID --follow`` waits for a task the store has not heard
#: of: one just submitted may not be recorded yet; a typo is not waited for
#: longer than this.
NEW_TASK_WAIT = 5.0

STATUSES: list[str] = list(get_args(TaskStatus))

# -- send ----------------------------------------------------------------------------


@click.command()
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
        fail(f"invalid task for queue {queue!r} ({tq.type.__name__}): {one_line(e)}")
    with clear_errors(f"cannot send to {queue!r}"):
        tid = tq.submit(data, delay=delay, id=task_id)
    click.echo(tid)
    app.close()


# -- one task --------------------------------------------------------------------------


class _TaskCommand(click.Command):
    """``kew task ID``; ``kew task cancel ID ...`` is the :func:`cancel` command."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        if args[:1] == ["cancel"]:
            return cancel.make_context(f"{info_name} cancel", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command(cls=_TaskCommand)
@app_option
@store_option
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
@json_option
@click.argument("task_id", metavar="ID")
def task(
    app_spec: str | None,
    store_url: str | None,
    follow: bool,
    poll: float,
    timeout: float | None,
    as_json: bool,
    task_id: str,
) -> None:
    """Status of task ID (a table), and its output so far; --follow tails it.
    ('kew task cancel ID' cancels it.)

    A task the store does not know is an error (exit code 2); with --follow
    kew first waits up to 5 seconds for it (one just submitted may not be
    recorded yet).  --json prints the task's record (the REST API's task
    document) with its output.
    """
    if follow and as_json:
        fail("--json prints the record once; it does not go with --follow")
    store, closer = _open_store(app_spec, store_url)
    try:
        with clear_errors("task store"):
            record = store.get(task_id)
            if record is None and follow:
                wait = NEW_TASK_WAIT if timeout is None else min(NEW_TASK_WAIT, timeout)
                record = _wait_recorded(store, task_id, wait, poll)
        if record is None:
            waited = f" after waiting {NEW_TASK_WAIT:g} s" if follow else ""
            fail(
                f"no task {task_id!r} in the store{waited} (a typo? is a recorder running: "
                "'kew recorder', or 'kew worker --record'?)"
            )
        if follow:
            _follow(store, task_id, poll, timeout)
            return
        with clear_errors("task store"):
            text, _ = store.output(task_id, 0)
        if as_json:
            import msgspec

            echo_json({**msgspec.to_builtins(record), "output": text})
            return
        _print_record(record)
        if text:
            click.echo("output:")
            click.echo(text, nl=not text.endswith("\n"))
    finally:
        closer()


@click.command("cancel")
@app_option
@json_option
@click.argument("task_id", metavar="ID")
def cancel(app_spec: str | None, as_json: bool, task_id: str) -> None:
    """Cancel task ID, queued or running, wherever its worker runs.

    A queued task never runs; a running one is told to stop (a command
    task's process group is killed); it ends 'cancelled', its output kept.
    A task that ended already is left alone (exit code 0, saying so);
    cancelling twice is cancelling once.  The cancel travels to the workers
    as messages on the app's broker (docs/tasks.md, "Cancel"), so it needs
    --app.  A task the store does not know is an error (exit code 2).
    --json prints the answer of POST /tasks/{id}/cancel.
    """
    if not app_spec:
        fail("kew task cancel needs --app MODULE:APP (or $KEW_APP): its broker and task store")
    import getpass
    import socket

    try:
        by = f"kew task cancel ({getpass.getuser()}@{socket.gethostname()})"
    except Exception:  # no user name to be found: who asked is only for the logs
        by = "kew task cancel"
    app = load_app(app_spec)
    try:
        with clear_errors(f"cannot cancel task {task_id!r}"):
            try:
                result = app.cancel(task_id, by=by)
            except KeyError:
                fail(
                    f"no task {task_id!r} in the store (a typo? is a recorder running: "
                    "'kew recorder', or 'kew worker --record'?)"
                )
    finally:
        app.close()
    if as_json:
        import msgspec

        echo_json(msgspec.to_builtins(result))
        return
    click.echo(result.detail)


def _wait_recorded(store: Any, task_id: str, wait: float, poll: float) -> Any:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        record = store.get(task_id)
        if record is not None:
            return record
    return None


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
        rows.append(["last error", first_line(r.last_error, 200)])
    print_table(["field", "value"], rows)


def _follow(store: Any, task_id: str, poll: float, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    offset = 0
    status = ""
    stop = threading.Event()
    on_signals(stop.set)
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
                    click.echo(f"[kew] error: {first_line(record.last_error, 500)}", err=True)
                sys.exit(1)
            return
        if deadline is not None and time.monotonic() > deadline:
            click.echo(f"[kew] gave up following {task_id} after {timeout}s", err=True)
            sys.exit(3)
        if stop.wait(poll):
            sys.exit(130)


# -- search ----------------------------------------------------------------------------


class IsoTime(click.ParamType):  # type: ignore[type-arg]
    """An ISO 8601 time (``2024-05-01``, ``2024-05-01T10:30``,
    ``2024-05-01T10:30:00+02:00``, ``...Z``), UTC when it has no offset; as
    epoch ms."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            t = datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(
                f"{value!r} is not an ISO 8601 time (e.g. 2024-05-01 or 2024-05-01T10:30:00Z)",
                param,
                ctx,
            )
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return round(t.timestamp() * 1000)


@click.command()
@app_option
@store_option
@click.option(
    "-q", "--queue", "queues", multiple=True, metavar="QUEUE", help="Only these queues (repeat)."
)
@click.option(
    "-s",
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only tasks with one of these statuses (repeat).",
)
@click.option("--since", type=IsoTime(), default=None, help="Created at or after (ISO 8601).")
@click.option("--until", type=IsoTime(), default=None, help="Created before (ISO 8601).")
@click.option(
    "--error",
    "error_text",
    default=None,
    metavar="TEXT",
    help="The last error contains TEXT (any case; a plain substring).",
)
@click.option("--worker", default=None, metavar="ID", help="Ran (or runs) on this worker.")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="At most this many.",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Skip this many first (the next page: --offset plus --limit).",
)
@json_option
def tasks(
    app_spec: str | None,
    store_url: str | None,
    queues: tuple[str, ...],
    statuses: tuple[str, ...],
    since: int | None,
    until: int | None,
    error_text: str | None,
    worker: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """Tasks in the store, newest first, found by filters (all must match).

    The filters of the REST API's GET /tasks: --queue and --status may be
    repeated (any of them); --since/--until bound the creation time (ISO
    8601, UTC when no offset is given; --since included, --until excluded).
    """
    store, closer = _open_store(app_spec, store_url)
    try:
        with clear_errors("task store"):
            found = store.search(
                queues=list(queues) or None,
                statuses=list(statuses) or None,
                since=since,
                until=until,
                error=error_text or None,
                worker=worker or None,
                limit=limit,
                offset=offset,
            )
    finally:
        closer()
    if as_json:
        import msgspec

        echo_json(msgspec.to_builtins(found))
        return
    rows = [
        [r.id, r.queue, r.status, r.attempt, fmt_time(r.created_at), first_line(r.last_error, 60)]
        for r in found
    ]
    print_table(["id", "queue", "status", "attempt", "created", "last error"], rows)
    more = f"; more with --offset {offset + limit}" if len(found) == limit else ""
    click.echo(f"{len(found)} task{'s' if len(found) != 1 else ''}{more}", err=True)
