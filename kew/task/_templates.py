"""The outcome mails' text: the default templates, the variables a
template may use (:data:`TEMPLATE_FIELDS`) and how they are filled in for an
:class:`~kew.task.model.Outcome`, checked, rendered and scrubbed of secrets.

A template is a :class:`string.Template` string (``$task_id``, ``$outcome``,
...) or a callable taking the :class:`~kew.task.model.Outcome` and returning
the text.  See docs/mail.md.

Private module: import these names from :mod:`kew.task.mail`.
"""

from __future__ import annotations

import datetime
import string
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kew.qchan.spi import ConfigError
from kew.task.model import Outcome

#: The outcome kinds a mail is about, the keys of the subjects by kind.
OUTCOME_KINDS: tuple[str, ...] = ("succeeded", "failed", "attempt-failed")

#: Subjects by outcome kind (``string.Template``; variables below).
DEFAULT_SUBJECTS: Mapping[str, str] = {
    "succeeded": "[kew] $queue task $task_id succeeded",
    "failed": "[kew] $queue task $task_id failed",
    "attempt-failed": "[kew] $queue task $task_id: attempt $attempt failed, will retry",
}

#: The body of every outcome mail (``string.Template``).
DEFAULT_BODY = """\
Task $task_id on queue $queue $outcome.

    Task:      $task_id
    Queue:     $queue
    Outcome:   $kind
    Attempts:  $attempts
    Time:      $time
    Requester: $requester
$error_block$status_block
This message was sent automatically by $app; please do not reply to it.
"""

#: The variables a template may use.
TEMPLATE_FIELDS: frozenset[str] = frozenset(
    {
        "app",  # the App's name
        "task_id",
        "queue",
        "kind",  # succeeded | failed | attempt-failed
        "outcome",  # a phrase: "succeeded", "failed for good after 3 attempts", ...
        "attempt",  # the attempt that ended (1, 2, ...)
        "attempts",  # the same, as the number of attempts made
        "time",  # when, ISO 8601 UTC
        "next_time",  # when the next attempt runs (attempt-failed), else ""
        "error",  # the last error, else ""
        "error_block",  # "\nLast error:\n    ...\n" or ""
        "status_url",  # base_url + "/tasks/<id>", or ""
        "status_block",  # "\nStatus and output: <url>\n" or ""
        "requester",  # the requester's address, or "(unknown)"
    }
)

#: Longer errors are cut to this many characters in the mails.
MAX_ERROR_CHARS = 4000


def _iso(ms: int | None) -> str:
    if ms is None:
        return ""
    return (
        datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def outcome_fields(
    outcome: Outcome[Any],
    *,
    app: str = "kew",
    base_url: str | None = None,
    requester: str | None = None,
) -> dict[str, str]:
    """The template variables (:data:`TEMPLATE_FIELDS`) for ``outcome``."""
    error = outcome.error.strip()
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "\n... (cut; see the task's output)"
    if outcome.kind == "succeeded":
        phrase = "succeeded" + (f" after {outcome.attempt} attempts" if outcome.attempt > 1 else "")
    elif outcome.kind == "failed":
        n = outcome.attempt
        phrase = f"failed for good after {n} attempt{'s' if n != 1 else ''}"
    else:
        phrase = f"failed on attempt {outcome.attempt}; it will be retried"
        if outcome.next_at is not None:
            phrase += f" at {_iso(outcome.next_at)}"
    status_url = f"{base_url.rstrip('/')}/tasks/{outcome.task_id}" if base_url else ""
    indented = "\n".join("    " + line for line in error.splitlines())
    return {
        "app": app,
        "task_id": outcome.task_id,
        "queue": outcome.queue,
        "kind": outcome.kind,
        "outcome": phrase,
        "attempt": str(outcome.attempt),
        "attempts": str(outcome.attempt),
        "time": _iso(outcome.at),
        "next_time": _iso(outcome.next_at),
        "error": error,
        "error_block": f"\nLast error:\n{indented}\n" if error else "",
        "status_url": status_url,
        "status_block": f"\nStatus and output: {status_url}\n" if status_url else "",
        "requester": requester or "(unknown)",
    }


def check_template(template: object, what: str) -> None:
    """Raise ConfigError if ``template`` is not a callable or a valid
    ``string.Template`` using only :data:`TEMPLATE_FIELDS`."""
    if callable(template):
        return
    if not isinstance(template, str):
        raise ConfigError(
            f"{what} must be a string.Template string or a callable, not {template!r}"
        )
    t = string.Template(template)
    if not t.is_valid():
        raise ConfigError(
            f"{what} is not a valid string.Template (a stray '$'? write '$$'): {template!r}"
        )
    unknown = sorted(set(t.get_identifiers()) - TEMPLATE_FIELDS)
    if unknown:
        raise ConfigError(
            f"{what} uses unknown variable(s) {', '.join('$' + u for u in unknown)}; "
            f"known: {', '.join(sorted(TEMPLATE_FIELDS))}"
        )


def render(
    template: str | Callable[[Outcome[Any]], str], outcome: Outcome[Any], fields: Mapping[str, str]
) -> str:
    """``template`` filled in for ``outcome``."""
    if callable(template):
        return str(template(outcome))
    return string.Template(template).substitute(fields)


def one_line(text: str, limit: int = 200) -> str:
    """``text`` as a single header-safe line of at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret (of 4 characters or more) replaced by ``***``."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
