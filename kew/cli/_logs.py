"""Logging of the long-running commands (``kew worker``, ``kew recorder``,
``kew serve``): ``--log-level`` and ``--log-format text|json``.

JSON is one object per line on stderr::

    {"time": "2024-05-01T10:00:00.123Z", "level": "WARNING", "logger": "kew.task",
     "message": "...", "process": 4242, "exc_info": "Traceback ..."}

(``exc_info`` only when the record carries an exception).  In both formats a
password in a URL (``scheme://user:password@host``) is written as ``***``,
whatever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = ["debug", "info", "warning", "error"]
FORMATS = ["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# scheme://user:password@ -> scheme://user:***@ (a safety net: kew redacts
# the URLs it logs itself, but a client library or an app may not)
_URL_PASSWORD = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")

_state = {"json": False}


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it as ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class TextFormatter(logging.Formatter):
    """The usual ``time LEVEL logger: message`` line, passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger,
    message, process, and exc_info (the traceback text) when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_urls(record.getMessage()),
            "process": record.process,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = mask_urls(record.exc_text)
        if record.stack_info:
            out["stack_info"] = mask_urls(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


def _iso(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def setup_logging(level: str, fmt: str = "text", adopt: Sequence[str] = ()) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``),
    replacing whatever handlers the root logger had; the loggers named in
    ``adopt`` (which a framework gave handlers of their own) lose theirs
    and go through the root's too."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of: {', '.join(FORMATS)})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in adopt:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
    _state["json"] = fmt == "json"


def json_logging() -> bool:
    """Whether this process logs JSON (``--log-format json``)."""
    return _state["json"]


def report_error(message: str) -> None:
    """A command's last word on stderr: ``kew: error: ...``, or, when the
    process logs JSON, an ERROR object like its other lines."""
    if json_logging():
        record = logging.LogRecord("kew.cli", logging.ERROR, "", 0, message, None, None)
        click.echo(JsonFormatter().format(record), err=True)
    else:
        click.echo(f"kew: error: {mask_urls(message)}", err=True)


def log_level_option(default: str = "info") -> Callable[[F], F]:
    return click.option(
        "--log-level",
        type=click.Choice(LEVELS),
        envvar="KEW_LOG_LEVEL",
        default=default,
        show_default=True,
        help="Logging level (stderr). $KEW_LOG_LEVEL.",
    )


log_format_option = click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    envvar="KEW_LOG_FORMAT",
    default="text",
    show_default=True,
    help="'json': one JSON object per line (time, level, logger, message, exc_info) "
    "for a log collector. $KEW_LOG_FORMAT.",
)
