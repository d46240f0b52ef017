"""Outcome-mail templates: variables, validation, secrets scrubbed."""

from __future__ import annotations

import logging
import os

import msgspec
import pytest

import kew
from kew.task import App
from kew.task.mail import (
    DEFAULT_BODY,
    DEFAULT_SUBJECTS,
    Mail,
    MailNotifier,
    check_template,
    one_line,
    outcome_fields,
    render,
    scrub_text,
)
from kew.task.model import Outcome, OutcomeKind

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


class Job(msgspec.Struct):
    email: str
    key: str = ""


def test_notifier_chooses_recipients_and_checks_its_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App(f"memory://tpl-{os.urandom(4).hex()}", name="svc", store="memory://")
    try:
        mail = app.task_queue("kew.mail", Mail, lambda m: None)
        plain = app.task_queue("plain", Job, lambda j: None)
        jobs = app.task_queue("jobs", Job, lambda j: None, notify=True)
        with pytest.raises(kew.ConfigError, match="declare it with notify=True"):
            MailNotifier(app, plain, mail, requester=lambda j: j.email)
        with pytest.raises(kew.ConfigError, match="unknown outcome kind 'done'"):
            MailNotifier(app, jobs, mail, requester=lambda j: j.email, subjects={"done": "x"})
        with pytest.raises(kew.ConfigError, match=r"unknown variable\(s\) \$id"):
            MailNotifier(app, jobs, mail, requester=lambda j: j.email, body="$id")
        with pytest.raises(kew.ConfigError, match=r"admin\[0\] 'root' is not an e-mail address"):
            MailNotifier(app, jobs, mail, requester=lambda j: j.email, admin="root")

        quiet = MailNotifier(app, jobs, mail, requester=lambda j: j.email, admin="ops@example.org")
        chatty = MailNotifier(
            app,
            jobs,
            mail,
            requester=lambda j: j.email,
            notify_attempts=True,
            subjects={"succeeded": lambda o: f"done: {o.data.key}"},
            status_url="https://svc.example.org/jobs/{task_id}/log",
            secrets=lambda j: [j.key],
        )

        def out(kind: OutcomeKind, email: str = "ann@example.org") -> Outcome[Job]:
            job = Job(email, "k3y-secret")
            return Outcome("t1", "jobs", kind, 2, AT, job, error="e k3y-secret")

        def ids(n: MailNotifier[Job], o: Outcome[Job]) -> list[str]:
            return [i for i, _ in n.mails(o)]

        assert ids(quiet, out("succeeded")) == ["t1-succeeded-2-requester"]
        assert ids(quiet, out("attempt-failed")) == []
        assert ids(quiet, out("failed")) == ["t1-failed-2-requester", "t1-failed-2-admin"]
        assert ids(chatty, out("attempt-failed")) == ["t1-attempt-failed-2-requester"]
        assert ids(chatty, out("failed")) == ["t1-failed-2-requester"]  # no admin configured
        ((_, m),) = chatty.mails(out("succeeded"))
        assert m.subject == "done: ***"
        assert "Status and output: https://svc.example.org/jobs/t1/log" in m.body
        assert "k3y-secret" not in m.body
        # A requester that is not an address: logged, skipped; the admin still hears.
        caplog.set_level(logging.WARNING)
        assert ids(quiet, out("failed", "not-an-address")) == ["t1-failed-2-admin"]
        assert "not mailing the requester" in caplog.text
        assert ids(quiet, out("succeeded", "")) == []
    finally:
        app.close()
