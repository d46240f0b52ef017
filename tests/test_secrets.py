"""Planted secrets never show: a broker password in a URL, a STOMP passcode,
an encryption key, an OMERO-like session key inside a message, a REST token,
an SMTP password.  Each test plants one, runs a real cycle (send, consume,
dead-letter, a connection failure, the CLI, the REST API, an SMTP login)
with logging at DEBUG, and greps everything a person or a log collector
could see: log records, exception messages and their chained causes,
``repr``/``str`` of connectors, queues and configuration objects, CLI output,
HTTP responses, the server's log, the bytes a broker stores."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

import kew
from kew.qchan.spi import Message
from kew.testing.util import free_port, port_open, require, wait_for
from tests.brokers.stomp_server import require_rabbitmq_stomp

ROOT = Path(__file__).resolve().parents[1]


def planted(what: str) -> str:
    """A secret that cannot occur by chance."""
    return f"{what}-{secrets.token_hex(12)}"


def shown(exc: BaseException) -> str:
    """Everything a traceback would print: the message and every cause."""
    return "".join(traceback.format_exception(exc))


def assert_absent(secret: str, **places: object) -> None:
    for name, text in places.items():
        assert secret not in str(text), f"the secret leaked into {name}: {str(text)[:500]}"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG (kew, redis-py, pika, stomp.py ...)."""
    caplog.set_level(logging.DEBUG)
    yield caplog


class AuthRedis:
    """A redis-server of this test's own that requires a password."""

    def __init__(self, workdir: Path, password: str) -> None:
        self.port = free_port()
        self.password = password
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        args += ["--requirepass", password]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(lambda: port_open("127.0.0.1", self.port), 20, what="redis-server")

    def url(self, password: str | None = None) -> str:
        return f"redis://:{password or self.password}@127.0.0.1:{self.port}/0?lease=1&retries=1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[AuthRedis]:
    require(_has("redis-server"), "redis-server is not installed")
    server = AuthRedis(tmp_path, planted("redis-pw"))
    yield server
    server.stop()


class Job(msgspec.Struct):
    n: int
    session_key: str = ""


# -- broker passwords ----------------------------------------------------------


def test_a_broker_password_in_the_url_never_shows(
    auth_redis: AuthRedis, debug_logs: pytest.LogCaptureFixture
) -> None:
    secret = auth_redis.password
    conn = kew.connect(auth_redis.url())
    q = kew.Queue(conn, "secrets-cycle", int)
    seen: list[int] = []

    def handle(n: int) -> None:
        if n == 3:
            raise RuntimeError("task 3 fails")
        seen.append(n)

    q.send_many([1, 2, 3])
    with q.sink(handle, concurrency=2):
        wait_for(lambda: len(seen) == 2 and q.browser().stats().dead == 1, 20, what="the cycle")
    dead = q.dead.list()
    assert [d.reason.splitlines()[0] for d in dead] == ["RuntimeError: task 3 fails"]
    assert_absent(
        secret,
        logs=debug_logs.text,
        connector_repr=repr(conn),
        connector_url=conn.url,
        queue_repr=repr(q),
        dead_letters=repr(dead),
    )
    assert "***" in conn.url
    q.close()
    conn.close()
    embedded = kew.connect(f"memory://kew:{secret}@x")
    assert_absent(secret, memory_connector=repr(embedded) + embedded.url)

    # a wrong password, an unreachable broker, a bad option: the errors
    wrong = planted("wrong-pw")
    with pytest.raises(Exception) as refused:
        kew.Queue(kew.connect(auth_redis.url(wrong)), "secrets-cycle", int).send(1)
    unreachable_url = f"redis://:{secret}@127.0.0.1:{free_port()}/0?retries=0"
    with pytest.raises(kew.BrokerUnavailable) as unreachable:
        kew.Queue(kew.connect(unreachable_url), "secrets-cycle", int).send(1)
    with pytest.raises(kew.ConfigError) as bad_option:
        kew.connect(f"redis://:{secret}@127.0.0.1:{auth_redis.port}/0?lease=soon")
    with pytest.raises(kew.ProviderNotFound) as no_provider:
        kew.connect(f"nosuch://user:{secret}@127.0.0.1/")
    for name, exc in [
        ("refused", refused.value),
        ("unreachable", unreachable.value),
        ("bad_option", bad_option.value),
        ("no_provider", no_provider.value),
    ]:
        assert_absent(secret, **{name: shown(exc)})
        assert_absent(wrong, **{name: shown(exc)})
    assert "***" in str(unreachable.value) and "***" in str(bad_option.value)
    assert_absent(secret, logs=debug_logs.text)
    assert_absent(wrong, logs=debug_logs.text)


def test_a_rabbitmq_password_never_shows(debug_logs: pytest.LogCaptureFixture) -> None:
    require(port_open("127.0.0.1", 5672), "no RabbitMQ at 127.0.0.1:5672")
    wrong = planted("amqp-pw")
    conn = kew.connect(f"amqp://guest:{wrong}@127.0.0.1:5672/?retries=0")
    with pytest.raises(kew.AccessRefused) as refused:
        kew.Queue(conn, "secrets-amqp", int).send(1)
    assert "authentication" in str(refused.value).lower()
    assert_absent(wrong, error=shown(refused.value), repr=repr(conn), logs=debug_logs.text)


def test_a_stomp_passcode_never_shows(debug_logs: pytest.LogCaptureFixture) -> None:
    """stomp.py logs each frame it sends at DEBUG, CONNECT included."""
    require_rabbitmq_stomp()  # RabbitMQ's STOMP plugin answers there, not another server
    wrong = planted("stomp-pw")
    with pytest.raises(kew.AccessRefused) as refused:
        conn = kew.connect(f"stomp://guest:{wrong}@127.0.0.1:61613/?dialect=rabbitmq&retries=0")
        kew.Queue(conn, "secrets-stomp", int).send(1)
    assert "access refused" in str(refused.value).lower()
    assert any("sending frame" in r.getMessage() for r in debug_logs.records)
    assert "passcode:***" in debug_logs.text
    assert_absent(wrong, error=shown(refused.value), logs=debug_logs.text)


# -- encryption keys and what they protect ---------------------------------------


def test_encryption_keys_and_session_keys_never_show(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("cryptography")
    raw_key = os.urandom(32)
    key_b64 = base64.b64encode(raw_key).decode()
    session = planted("omero-session")
    db = tmp_path / "enc.sqlite3"
    conn = kew.connect(f"sqlite:///{db}")
    q = kew.Queue(conn, "imports", Job, encryption_keys=f"k1:{key_b64}")
    done: list[int] = []

    def handle(job: Job) -> None:
        if job.n == 2:
            raise RuntimeError(f"import {job.n} failed")
        done.append(job.n)

    q.send(Job(1, session))
    q.send(Job(2, session))
    # a tampered body: dead-lettered with a reason
    stored = conn.browser("imports").peek(1)[0]
    tampered = stored.body[:-1] + bytes([stored.body[-1] ^ 1])
    p = conn.producer("imports")
    p.send(Message("tampered", tampered, dict(stored.headers)))
    p.close()
    with q.sink(handle):
        wait_for(lambda: done == [1] and q.browser().stats().dead == 2, 20, what="the cycle")
    reasons = [d.reason for d in q.dead.list()]
    assert any("tampered" in r or "authentic" in r or "decrypt" in r for r in reasons), reasons
    q.close()
    conn.close()
    everything_stored = b"".join(p.read_bytes() for p in tmp_path.glob("enc.sqlite3*"))
    assert session.encode() not in everything_stored, "a session key is stored in clear"
    assert raw_key not in everything_stored and key_b64.encode() not in everything_stored
    for secret in (key_b64, session):
        assert_absent(
            secret,
            logs=debug_logs.text,
            queue_repr=repr(q),
            codec_repr=repr(q.codec),
            reasons=reasons,
        )
    # a key that is not right: the error names the key id, not the key
    short = base64.b64encode(os.urandom(10)).decode()
    with pytest.raises(kew.ConfigError, match="'k9' has 10 bytes") as bad:
        kew.Queue(kew.connect("memory://enc"), "x", int, encryption_keys=f"k9:{short}")
    assert_absent(short, error=shown(bad.value))


def test_a_session_key_in_a_bad_message_stays_out_of_the_reason(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    """A body that does not decode is dead-lettered with msgspec's reason,
    which names the field and the types, never the values."""
    session = planted("omero-session")
    conn = kew.connect(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    q = kew.Queue(conn, "imports", Job)
    p = conn.producer("imports")
    for i, body in enumerate(
        [
            b'{"n": "%s", "session_key": "%s"}' % (session.encode(), session.encode()),
            b'{"n": 1, "session_key": 5, "x": "%s"}' % session.encode(),
            b'["%s"]' % session.encode(),
        ]
    ):
        p.send(Message(f"bad{i}", body, {"content-type": "application/json"}))
    p.close()
    with q.sink(lambda job: None):
        wait_for(lambda: q.browser().stats().dead == 3, 20, what="3 dead letters")
    reasons = [d.reason for d in q.dead.list()]
    assert all(r.startswith("cannot decode as tests.test_secrets.Job") for r in reasons), reasons
    assert_absent(session, reasons=reasons, logs=debug_logs.text)
    conn.close()


# -- the CLI ---------------------------------------------------------------------


def _kew(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kew.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_never_prints_a_password(auth_redis: AuthRedis) -> None:
    secret, url = auth_redis.password, auth_redis.url()
    conn = kew.connect(url)
    q = kew.Queue(conn, "secrets-cli", int)
    q.send(1)
    with q.sink(lambda n: (_ for _ in ()).throw(RuntimeError("no"))):
        wait_for(lambda: q.browser().stats().dead == 1, 20, what="a dead letter")
    dead_id = q.dead.list()[0].id
    conn.close()
    wrong = planted("wrong-pw")
    runs = {
        "queues": _kew("queues", "--url", url, "--queue", "secrets-cli"),
        "queues_env": _kew("queues", "--queue", "secrets-cli", env={"KEW_URL": url}),
        "dead_list": _kew("dead", "list", "secrets-cli", "--url", url),
        "dead_show": _kew("dead", "show", "secrets-cli", dead_id, "--url", url),
        "refused": _kew("queues", "--url", auth_redis.url(wrong), "--queue", "secrets-cli"),
    }
    assert runs["queues"].returncode == 0, runs["queues"].stderr
    assert "secrets-cli" in runs["queues"].stdout
    assert "RuntimeError: no" in runs["dead_show"].stdout
    assert runs["refused"].returncode != 0
    assert "kew: error:" in runs["refused"].stderr
    for name, run in runs.items():
        assert_absent(secret, **{name: run.stdout + run.stderr})
        assert_absent(wrong, **{name: run.stdout + run.stderr})


# -- the REST API ------------------------------------------------------------------


def test_rest_responses_and_the_server_log_never_show_tokens_or_session_keys(
    tmp_path: Path,
) -> None:
    pytest.importorskip("litestar")
    from tests.apps.web_server import WebServer

    server = WebServer(tmp_path).start()
    session, wrong_token = planted("omero-session"), planted("wrong-token")
    try:
        # a message with a session key that ends in the dead letters
        conn = kew.connect(server.url)
        p = conn.producer("thumbs")
        body = b'{"image_id": "x", "sessionKey": "%s"}' % session.encode()
        p.send(Message("withkey", body, {"content-type": "application/json"}))
        p.close()
        conn.close()
        responses: list[httpx.Response] = []
        with server.client(server.admin) as admin:
            wait_for(
                lambda: any(
                    q["dead"] for q in admin.get("/queues").json() if q["name"] == "thumbs"
                ),
                30,
                what="the dead letter",
            )
            responses.append(admin.get("/queues/thumbs/dead"))
            responses.append(admin.get("/queues"))
            responses.append(admin.post("/queues/thumbs/tasks", json={"image_id": "bad"}))
            responses.append(admin.get("/tasks"))
            responses.append(admin.get("/metrics"))
        with server.client(wrong_token) as intruder:
            responses.append(intruder.get("/tasks"))
            responses.append(intruder.post("/queues/thumbs/tasks", json={"image_id": 1}))
        with server.client(server.read) as reader:
            responses.append(reader.post("/queues/thumbs/dead/purge", json={"all": True}))
        assert [r.status_code for r in responses[-3:]] == [401, 401, 403]
        assert responses[0].status_code == 200 and "withkey" in responses[0].text
        assert "***" in responses[0].text  # the session key's value is masked
    finally:
        server.stop()
    texts = (
        "\n".join(f"{r.status_code} {dict(r.headers)} {r.text}" for r in responses) + server.log()
    )
    for secret in (server.admin, server.read, wrong_token, session):
        assert_absent(secret, responses_and_server_log=texts)


# -- SMTP ----------------------------------------------------------------------------


def test_an_smtp_password_never_shows(debug_logs: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("aiosmtpd")
    from kew.task.mail import Mail, MailError, SmtpConfig, SmtpSender
    from tests.smtp import SmtpServer

    secret = planted("smtp-pw")
    with SmtpServer(users={"kew": "the-right-one"}) as smtp:
        config = SmtpConfig(
            sender="kew@example.org",
            host=smtp.host,
            port=smtp.port,
            security="none",
            allow_plain_login=True,
            username="kew",
            password=secret,
        )
        sender = SmtpSender(config)
        with pytest.raises(MailError) as refused:
            sender.send(Mail(to=["a@example.org"], subject="s", body="b"))
        assert not smtp.messages
    auth_forms = config.secret_forms()
    assert secret in auth_forms and len(auth_forms) > 1
    for form in auth_forms:  # the password and its base64 AUTH forms
        assert_absent(
            form,
            error=shown(refused.value),
            config_repr=repr(config),
            config_str=str(config),
            sender_repr=repr(sender),
            logs=debug_logs.text,
        )
