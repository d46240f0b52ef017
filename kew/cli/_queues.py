"""``kew queues`` (depths) and ``kew dead list|show|requeue|purge``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import click

from kew.cli._common import (
    app_option,
    close_quietly,
    describe,
    fail,
    json_option,
    one_line,
    queue_errors,
    target,
    unknown_to_app,
    url_option,
)
from kew.cli._logs import report_error
from kew.cli._output import (
    count,
    dead_letter_json,
    echo_json,
    first_line,
    fmt_time,
    known,
    print_table,
)
from kew.qchan.spi import BrokerUnavailable, Browser, Connector, QueueStats
from kew.qchan.spi.urls import redact

# -- queues ----------------------------------------------------------------------------


@click.command()
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
@json_option
def queues(app_spec: str | None, url: str | None, queues: tuple[str, ...], as_json: bool) -> None:
    """Depth of queues: ready, in flight, delayed, dead letters.

    With --app, the app's queues (task queues, outcomes, events, extra
    consumers); with --url, the queues named by --queue.  A count a broker
    cannot tell shows as '?' (null in JSON).  A queue that does not exist
    (or that the broker refuses) is one error line on stderr after the
    others are shown, and makes the exit code 2.
    """
    app, connector = target(app_spec, url)
    names = list(queues) or (app.queue_names() if app is not None else [])
    if not names:
        close_quietly(app, connector)
        fail("name the queues with --queue (a broker URL alone does not list its queues)")
    found: list[tuple[str, QueueStats]] = []
    errors: list[str] = []
    try:
        for name in names:
            why = unknown_to_app(app, name)
            if why is not None:
                errors.append(why)
                continue
            try:
                found.append((name, _stats(connector, name)))
            except BrokerUnavailable as e:  # the same for every queue: say it once
                fail(f"queue {name!r}: {one_line(e)}")
            except Exception as e:
                errors.append(f"queue {name!r}: {describe(e)}")
    finally:
        close_quietly(app, connector)
    if as_json:
        echo_json(
            [
                {
                    "queue": name,
                    "ready": known(s.ready),
                    "in_flight": known(s.in_flight),
                    "delayed": known(s.delayed),
                    "dead": known(s.dead),
                }
                for name, s in found
            ]
        )
    elif found:
        rows = [
            [name, count(s.ready), count(s.in_flight), count(s.delayed), count(s.dead)]
            for name, s in found
        ]
        print_table(
            ["queue", "ready", "in flight", "delayed", "dead"], rows, title=redact(connector.url)
        )
    for error in errors:
        report_error(error)
    if errors:
        sys.exit(2)


def _stats(connector: Connector, name: str) -> QueueStats:
    b = connector.browser(name)
    try:
        return b.stats()
    finally:
        with suppress(Exception):  # (a channel the broker closed on a 404 ...)
            b.close()


# -- dead letters ----------------------------------------------------------------------


@click.group()
def dead() -> None:
    """Dead letters of a queue: list, show, requeue, purge."""


@contextmanager
def _dead_browser(app_spec: str | None, url: str | None, queue: str) -> Iterator[Browser]:
    app, connector = target(app_spec, url)
    try:
        why = unknown_to_app(app, queue)
        if why is not None:
            fail(why)
        with queue_errors(queue):
            b = connector.browser(queue)
        try:
            with queue_errors(queue):
                yield b
        finally:
            with suppress(Exception):
                b.close()
    finally:
        close_quietly(app, connector)


@dead.command("list")
@app_option
@url_option
@click.option("-n", "--limit", type=click.IntRange(min=1), default=100, show_default=True)
@json_option
@click.argument("queue")
def dead_list(app_spec: str | None, url: str | None, limit: int, as_json: bool, queue: str) -> None:
    """List QUEUE's dead letters: id, deliveries, when, the reason's first line.

    With --json: every field, the full reason, the headers and the body.
    """
    with _dead_browser(app_spec, url, queue) as b:
        letters = b.dead_letters(limit)
        total = b.stats().dead
    if as_json:
        echo_json([dead_letter_json(d, queue) for d in letters])
    else:
        rows = [
            [d.message.id, d.delivery_count, fmt_time(d.dead_at), first_line(d.reason, 80)]
            for d in letters
        ]
        print_table(["id", "count", "dead at", "reason"], rows)
    n = len(letters)
    shown = f"{n} of {total}" if total > n else str(n)
    click.echo(f"{shown} dead letter{'s' if n != 1 else ''} on {queue}", err=True)


@dead.command("show")
@app_option
@url_option
@json_option
@click.argument("queue")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
def dead_show(
    app_spec: str | None, url: str | None, as_json: bool, queue: str, ids: tuple[str, ...]
) -> None:
    """Show dead letters in full: reason, headers and body."""
    with _dead_browser(app_spec, url, queue) as b:
        found = {d.message.id: d for d in b.dead_letters(100_000) if d.message.id in ids}
    missing = [i for i in ids if i not in found]
    if as_json:
        echo_json([dead_letter_json(found[i], queue) for i in ids if i in found])
    for i in ids:
        d = found.get(i)
        if d is None or as_json:
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
    which: list[str] | None,
    queue: str,
    done: str,
    act: Callable[[Browser, list[str] | None], int],
) -> None:
    """``act`` on the dead letters of ``queue`` given (ids or all); print
    how many were ``done``, and fail if some ids were not dead letters."""
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
    which = _ids_or_all(ids, all_, "requeue")
    _settle_dead(app_spec, url, which, queue, "requeued", lambda b, w: b.requeue_dead(w))


@dead.command("purge")
@_by_ids_or_all
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Purge --all without asking (needed when stdin is not a terminal).",
)
def dead_purge(
    app_spec: str | None, url: str | None, all_: bool, queue: str, ids: tuple[str, ...], yes: bool
) -> None:
    """Delete dead letters of QUEUE for good (by id, or --all); prints how many.

    --all asks for confirmation first, unless --yes; when stdin is not a
    terminal (a script), --all without --yes is refused (exit code 2).
    """
    which = _ids_or_all(ids, all_, "purge")
    if which is None and not yes and not sys.stdin.isatty():
        fail(
            f"'kew dead purge --all' deletes every dead letter of {queue!r} for good: "
            "add --yes to confirm (stdin is not a terminal, so kew cannot ask)"
        )

    def purge(b: Browser, which: list[str] | None) -> int:
        if which is None and not yes:
            _confirm_purge(queue, b.stats().dead)
        return b.purge_dead(which)

    _settle_dead(app_spec, url, which, queue, "purged", purge)


def _confirm_purge(queue: str, n: int) -> None:
    if n == 0:
        return
    letters = "every dead letter" if n < 0 else f"{n} dead letter{'s' if n != 1 else ''}"
    if not click.confirm(f"Delete {letters} of {queue!r} for good?", err=True):
        click.echo("kew: nothing purged", err=True)
        raise click.exceptions.Exit(1)
