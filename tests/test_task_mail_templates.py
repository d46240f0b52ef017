"""Outcome-mail templates: variables, validation, secrets scrubbed."""

from __future__ import annotations

import pytest

import kew
from kew.task.mail import (
    DEFAULT_BODY,
    DEFAULT_SUBJECTS,
    check_template,
    one_line,
    outcome_fields,
    render,
    scrub_text,
)
from kew.task.model import Outcome

AT = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def outcome(kind: str, **kw: object) -> Outcome[dict[str, str]]:
    args: dict[str, object] = {
        "task_id": "abc123",
        "queue": "imports",
        "kind": kind,
        "attempt": 3,
        "at": AT,
        "data": {"who": "ann@example.org"},
    }
    args.update(kw)
    return Outcome(**args)  # type: ignore[arg-type]


def test_default_templates() -> None:
    o = outcome("failed", error="Boom: disk full\nsecond line")
    fields = outcome_fields(
        o, app="svc", base_url="https://kew.example.org/api/", requester="ann@x.org"
    )
    assert render(DEFAULT_SUBJECTS["failed"], o, fields) == "[kew] imports task abc123 failed"
    body = render(DEFAULT_BODY, o, fields)
    assert "Task abc123 on queue imports failed for good after 3 attempts." in body
    assert "    Attempts:  3\n" in body
    assert "    Time:      2023-11-14T22:13:20Z\n" in body
    assert "Last error:\n    Boom: disk full\n    second line\n" in body
    assert "Status and output: https://kew.example.org/api/tasks/abc123\n" in body
    assert "Requester: ann@x.org" in body
    assert "sent automatically by svc" in body

    ok = outcome("succeeded", attempt=1)
    ok_body = render(DEFAULT_BODY, ok, outcome_fields(ok))
    assert "Task abc123 on queue imports succeeded.\n" in ok_body
    assert "Last error" not in ok_body and "Status and output" not in ok_body
    assert "Requester: (unknown)" in ok_body

    retry = outcome("attempt-failed", attempt=1, next_at=AT + 60_000, error="busy")
    f = outcome_fields(retry)
    assert render(DEFAULT_SUBJECTS["attempt-failed"], retry, f) == (
        "[kew] imports task abc123: attempt 1 failed, will retry"
    )
    assert "failed on attempt 1; it will be retried at 2023-11-14T22:14:20Z" in render(
        DEFAULT_BODY, retry, f
    )


def test_long_errors_are_cut() -> None:
    o = outcome("failed", error="x" * 10_000)
    assert len(outcome_fields(o)["error"]) < 4100


def test_template_validation() -> None:
    check_template("$queue: $task_id ($outcome)", "subject")
    check_template(lambda o: o.task_id, "subject")
    with pytest.raises(kew.ConfigError, match=r"unknown variable\(s\) \$taskid"):
        check_template("task $taskid", "subject")
    with pytest.raises(kew.ConfigError, match=r"not a valid string\.Template"):
        check_template("costs $5", "body")
    with pytest.raises(kew.ConfigError, match=r"must be a string\.Template string or a callable"):
        check_template(42, "body")
    assert render(lambda o: f"custom {o.data['who']}", outcome("succeeded"), {}) == (
        "custom ann@example.org"
    )


def test_helpers() -> None:
    assert one_line("a\r\nb   c") == "a b c"
    assert len(one_line("y" * 500)) == 200
    assert scrub_text("key s3ss10n-k3y and ab", ["s3ss10n-k3y", "ab", ""]) == "key *** and ab"
