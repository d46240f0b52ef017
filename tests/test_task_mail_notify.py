"""Outcome e-mail end to end: a real worker runs tasks, the notifier queues
mails, the mail queue sends them to a real SMTP server on loopback
(aiosmtpd).  Refusing servers, dead mail and requeue, TLS with a wrong CA,
and a planted password that must show up nowhere."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kew.task.app import App
from kew.task.errors import Permanent
from kew.task.mail import Mail, MailNotifier, SmtpConfig, mail_queue
from kew.task.retry import Intervals
from kew.task.worker import Worker
from kew.testing.util import port_open, require, wait_for
from tests.brokers.tls import make_certs
from tests.smtp import IGNORE_AUTH_WARNING, SmtpServer, body_of, raw_of

pytestmark = pytest.mark.filterwarnings(IGNORE_AUTH_WARNING)

SECRET = "pl4nted-smtp-S3cret"
SESSION = "s3ssion-key-0123456789"
ADMIN = "admin@example.org"


class Job(msgspec.Struct):
    n: int
    email: str
    session: str = ""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_certs(tmp_path_factory.mktemp("smtp-certs"))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield fresh_memory()
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kew.sqlite3'}"
    else:
        require(port_open("127.0.0.1", 6379), "no Redis on 127.0.0.1:6379")
        import redis

        prefix = f"mailtest-{os.urandom(4).hex()}"  # keys of this test's own
        yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
        client = redis.Redis(host="127.0.0.1", port=6379, db=0)
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def fresh_memory() -> str:
    """A memory:// broker of the test's own (the name picks the broker)."""
    return f"memory://mail-{os.urandom(6).hex()}"


@contextmanager
def running(app: App, concurrency: int = 4) -> Iterator[Worker]:
    """A real worker (task queues, the app's consumers, the recorder) in
    this process; closes the app afterwards."""
    worker = app.worker(concurrency=concurrency, record=True)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(5)
        app.close()


def plain(server: SmtpServer, **kw: Any) -> SmtpConfig:
    return SmtpConfig(
        sender="Kew <kew@example.org>",
        host=server.host,
        port=server.port,
        security="none",
        timeout=5,
        **kw,
    )


def test_requester_and_admin_mails_over_starttls(
    url: str, certs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer(mode="starttls", certs=certs, users={"kew": SECRET}) as server:
        app = App(url, name="mailtest", store="memory://")
        config = SmtpConfig(
            sender="Kew <kew@example.org>",
            host=server.host,
            port=server.port,
            username="kew",
            password=SECRET,
            ca_file=certs["ca"],
            timeout=10,
        )
        mail = mail_queue(app, config, retry=Intervals([0.1, 0.1]))

        def run_job(j: Job) -> None:
            if j.n == 1:
                raise Permanent(f"bad input {j.n} (session {j.session})")
            if j.n == 2:
                raise RuntimeError(f"flaky {j.n}; password={SECRET}")

        job = app.task_queue("jobs", Job, run_job, retry=Intervals([0.05, 0.05]), notify=True)

        MailNotifier(
            app,
            job,
            mail,
            requester=lambda j: j.email,
            admin=ADMIN,
            base_url="http://kew.test/api/",
            secrets=lambda j: [j.session],
        )
        with running(app):
            ok = job.submit(Job(0, "ann@example.org", SESSION))
            perm = job.submit(Job(1, "bob@example.org", SESSION))
            exceeded = job.submit(Job(2, "cy@example.org", SESSION))
            server.wait_for(5, timeout=30)
            # The mail tasks themselves succeed and are recorded.
            wait_for(
                lambda: all(
                    (r := app.status(f"{t}-{k}-{n}-{who}")) is not None and r.status == "succeeded"
                    for t, k, n, who in [
                        (ok, "succeeded", 1, "requester"),
                        (perm, "failed", 1, "admin"),
                        (exceeded, "failed", 3, "admin"),
                    ]
                ),
                10,
                what="the mail tasks recorded as succeeded",
            )
        assert len(server.messages) == 5, [m["Subject"] for m in server.messages]
        assert server.logins and set(server.logins) == {"kew"}

        (ann,) = server.to("ann@example.org")
        assert ann["Subject"] == f"[kew] jobs task {ok} succeeded"
        assert ann["From"] == "Kew <kew@example.org>"
        assert ann["Auto-Submitted"] == "auto-generated"
        body = body_of(ann)
        assert f"Task {ok} on queue jobs succeeded." in body
        assert "Attempts:  1" in body
        assert f"Status and output: http://kew.test/api/tasks/{ok}" in body
        assert "Last error" not in body

        (bob,) = server.to("bob@example.org")
        assert bob["Subject"] == f"[kew] jobs task {perm} failed"
        body = body_of(bob)
        assert "failed for good after 1 attempt." in body
        # The session key is scrubbed by the notifier (secrets=...).
        assert (
            "Last error:\n    permanent failure in attempt 1: bad input 1 (session ***)\n" in body
        )

        (cy,) = server.to("cy@example.org")
        assert cy["Subject"] == f"[kew] jobs task {exceeded} failed"
        body = body_of(cy)
        assert "failed for good after 3 attempts" in body
        # The SMTP password in the error is scrubbed by the mail queue.
        assert "failed after 3 attempts: RuntimeError: flaky 2; password=***\n" in body
        assert f"Status and output: http://kew.test/api/tasks/{exceeded}" in body

        admin = server.to(ADMIN)
        assert sorted(m["Subject"] for m in admin) == sorted(
            [f"[kew] jobs task {perm} failed", f"[kew] jobs task {exceeded} failed"]
        )
        assert all("Requester: " in body_of(m) for m in admin)
        assert server.to("ann@example.org") == [ann]  # success: no admin mail

        for m in server.messages:
            text = raw_of(m)
            assert SECRET not in text, "the SMTP password leaked into a mail"
            assert SESSION not in text, "a secret of the task's data leaked into a mail"
    assert SECRET not in caplog.text


def test_refusing_server_is_retried_then_delivers(url: str) -> None:
    refused = threading.Semaphore(0)
    lock = threading.Lock()
    count = [0]

    def verdict(envelope: object) -> str | None:
        with lock:
            count[0] += 1
            if count[0] <= 2:
                refused.release()
                return "451 4.3.0 greylisted, try again later"
        return None

    with SmtpServer(verdict=verdict) as server:
        app = App(url, name="mailtest", store="memory://")
        mail = mail_queue(app, plain(server), retry=Intervals([0.1, 0.1, 0.1]))
        with running(app):
            tid = mail.submit(Mail(to=["ann@example.org"], subject="hello", body="hi\n"))
            (got,) = server.wait_for(1, timeout=20)
            wait_for(
                lambda: (r := app.status(tid)) is not None and r.final,
                10,
                what="the mail task's final status",
            )
            record = app.status(tid)
            assert mail.queue.dead.list() == []
        assert server.refusals == ["451 4.3.0 greylisted, try again later"] * 2
        assert got["Subject"] == "hello"
        assert got["Message-ID"] == f"<{tid}@example.org>"
        assert record is not None
        assert record.status == "succeeded" and record.attempt == 3


def test_mail_that_cannot_be_sent_is_dead_mail_and_can_be_requeued(url: str) -> None:
    replies = {
        "temp@example.org": "451 4.3.0 try later",
        "perm@example.org": "550 5.1.1 no such user",
    }
    accepting = threading.Event()

    def verdict(envelope: Any) -> str | None:
        if accepting.is_set():
            return None
        return replies.get(envelope.rcpt_tos[0])

    with SmtpServer(verdict=verdict) as server:
        app = App(url, name="mailtest", store="memory://")
        mail = mail_queue(app, plain(server), retry=Intervals([0.05, 0.05]))
        with running(app):
            temp = mail.submit(Mail(to=["temp@example.org"], subject="t", body="temporary\n"))
            perm = mail.submit(Mail(to=["perm@example.org"], subject="p", body="permanent\n"))
            wait_for(lambda: len(mail.queue.dead.list()) == 2, 20, what="two dead mails")
            dead = mail.queue.dead.list()
            by_id = {d.id: d for d in dead}
            assert set(by_id) == {temp, perm}
            assert "451 4.3.0 try later" in by_id[temp].reason
            assert "550 5.1.1 no such user" in by_id[perm].reason
            assert msgspec.json.decode(by_id[perm].body, type=Mail).body == "permanent\n"
            # 451: three attempts; 550: one.
            assert sorted(server.refusals) == sorted(
                ["451 4.3.0 try later"] * 3 + ["550 5.1.1 no such user"]
            )
            assert server.messages == []
            wait_for(
                lambda: all(
                    (r := app.status(t)) is not None and r.status == "failed" for t in (temp, perm)
                ),
                10,
                what="both mail tasks failed in the store",
            )
            # The cause is fixed: requeue the dead mail, it goes out.
            accepting.set()
            assert mail.queue.dead.requeue() == 2
            server.wait_for(2, timeout=20)
            assert sorted(m["Subject"] for m in server.messages) == ["p", "t"]
            assert mail.queue.dead.list() == []


def test_recipients_refused_for_now_get_a_resend_of_their_own() -> None:
    full_once = threading.Event()

    def rcpt(address: str) -> str | None:
        if address == "full@example.org" and not full_once.is_set():
            full_once.set()
            return "452 4.2.2 mailbox full"
        return None

    with SmtpServer(rcpt_verdict=rcpt) as server:
        app = App(fresh_memory(), name="mailtest", store="memory://")
        mail = mail_queue(app, plain(server), retry=Intervals([0.05]))
        with running(app):
            mail.submit(
                Mail(to=["ann@example.org"], cc=["full@example.org"], subject="s", body="b\n")
            )
            server.wait_for(2, timeout=20)
        assert [rcpts for _, rcpts in server.envelopes] == [
            ["ann@example.org"],
            ["full@example.org"],
        ]
        second = server.messages[1]
        assert (second["To"], second["Cc"]) == ("ann@example.org", "full@example.org")


def test_wrong_ca_never_falls_back_to_plain_text(certs: dict[str, str], tmp_path: Path) -> None:
    other = make_certs(tmp_path)["ca"]  # a CA that did not sign the server's certificate
    with SmtpServer(mode="starttls", certs=certs, users={"kew": SECRET}) as server:
        app = App(fresh_memory(), name="mailtest", store="memory://")
        config = SmtpConfig(
            sender="kew@example.org",
            host=server.host,
            port=server.port,
            username="kew",
            password=SECRET,
            ca_file=other,
            timeout=5,
        )
        mail = mail_queue(app, config, retry=Intervals([0.05]))
        with running(app):
            tid = mail.submit(Mail(to=["ann@example.org"], subject="s", body="b\n"))
            wait_for(lambda: mail.queue.dead.list(), 20, what="the dead mail")
            (dead,) = mail.queue.dead.list()
        assert dead.id == tid
        assert "TLS certificate not trusted" in dead.reason
        assert "never sent in clear" in dead.reason
        assert SECRET not in dead.reason
        assert server.messages == [] and server.logins == []


def test_the_smtp_password_is_scrubbed_from_mails_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer(mode="plain", users={"kew": SECRET}) as server:
        app = App(fresh_memory(), name="mailtest", store="memory://")
        config = plain(server, username="kew", password=SECRET, allow_plain_login=True)
        mail = mail_queue(app, config, retry=Intervals([0.05]))
        assert SECRET not in repr(config) and SECRET not in repr(mail)
        with running(app):
            mail.submit(
                Mail(
                    to=["ann@example.org"],
                    subject=f"pw {SECRET}",
                    body=f"the password is {SECRET}\n",
                    html=f"<p>{SECRET}</p>",
                )
            )
            (got,) = server.wait_for(1, timeout=20)
        assert SECRET not in raw_of(got)
        assert got["Subject"] == "pw ***"
        assert "the password is ***" in body_of(got)
    assert SECRET not in caplog.text


def test_a_refused_login_leaves_no_password_in_store_dead_letters_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer(mode="plain", users={"kew": "the-right-one"}) as server:
        app = App(fresh_memory(), name="mailtest", store="memory://")
        config = plain(server, username="kew", password=SECRET, allow_plain_login=True)
        mail = mail_queue(app, config, retry=Intervals([0.05]))
        with running(app):
            tid = mail.submit(Mail(to=["ann@example.org"], subject="s", body="b\n"))
            wait_for(lambda: mail.queue.dead.list(), 20, what="the dead mail")
            wait_for(
                lambda: (r := app.status(tid)) is not None and r.final, 10, what="final status"
            )
            (dead,) = mail.queue.dead.list()
            record = app.status(tid)
            output, _ = app.output(tid)
        assert record is not None and record.status == "failed" and record.attempt == 1
        assert "login as 'kew' refused: 535" in dead.reason  # 5xx: no retry
        assert "535" in record.last_error
        for text in (dead.reason, record.last_error, output, caplog.text):
            for form in config.secret_forms():  # the password, and as AUTH sends it
                assert form not in text
        assert server.messages == []
