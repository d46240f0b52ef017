"""What the commands print: tables (rich on a terminal, aligned plain text
otherwise), times, and JSON for scripts."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from kew.qchan.spi import DeadLetter


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


def count(n: int) -> str:
    """A queue count for a table: ``?`` when the broker cannot tell."""
    return "?" if n < 0 else str(n)


def known(n: int) -> int | None:
    """A queue count for JSON: null when the broker cannot tell."""
    return None if n < 0 else n


def first_line(text: str, width: int) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def echo_json(value: Any) -> None:
    """``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def dead_letter_json(d: DeadLetter, queue: str) -> dict[str, Any]:
    """A dead letter for ``--json``: the body as text when it is UTF-8,
    else ``body_base64``."""
    out: dict[str, Any] = {
        "id": d.message.id,
        "queue": queue,
        "delivery_count": d.delivery_count,
        "dead_at": d.dead_at,
        "reason": d.reason,
        "headers": dict(d.message.headers),
    }
    try:
        out["body"] = d.message.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(d.message.body).decode("ascii")
    return out
