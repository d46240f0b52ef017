"""The SMTP side of kew.task.mail against a real SMTP server on loopback
(aiosmtpd): config validation, STARTTLS, SMTPS, login, refusals mapped to
temporary/permanent errors, wrong CA refused without a plain-text fallback,
and the password nowhere to be seen."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import msgspec
import pytest

import kew
from kew.task.mail import (
    Mail,
    MailPermanentError,
    MailTemporaryError,
    SmtpConfig,
    SmtpSender,
    build_message,
)
from kew.testing.util import free_port
from tests.brokers.tls import make_certs
from tests.smtp import IGNORE_AUTH_WARNING, SmtpServer, body_of, raw_of

pytestmark = pytest.mark.filterwarnings(IGNORE_AUTH_WARNING)

SECRET = "pl4nted-S3cret-pw"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_certs(tmp_path_factory.mktemp("smtp-certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_certs(tmp_path_factory.mktemp("other-ca"))["ca"]


def mail(**kw: object) -> Mail:
    args: dict[str, object] = {"to": ["Ann <ann@example.org>"], "subject": "hi", "body": "hello\n"}
    args.update(kw)
    return Mail(**args)  # type: ignore[arg-type]


# -- validation ----------------------------------------------------------------


def test_config_validation_names_the_problem(tmp_path: Path) -> None:
    ok = SmtpConfig(sender="kew@example.org")
    assert (ok.port, ok.security) == (587, "starttls")
    assert SmtpConfig(sender="kew@example.org", security="ssl").port == 465
    assert SmtpConfig(sender="kew@example.org", security="none").port == 25
    cases: list[tuple[dict[str, object], str]] = [
        ({"port": 70000}, "port must be between 1 and 65535"),
        ({"port": -1}, "port must be between"),
        ({"port": "25"}, "port must be an integer"),
        ({"security": "tls"}, "security must be one of none, starttls, ssl"),
        ({"sender": "not an address"}, "sender 'not an address' is not an e-mail address"),
        ({"sender": "a@b\r\nBcc: x@y"}, "line break"),
        ({"host": ""}, "host must be"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"username": "u"}, "username and password go together"),
        ({"ca_file": str(tmp_path / "missing.pem")}, "is not a readable file"),
        (
            {"security": "none", "username": "u", "password": SECRET},
            "would send the password in clear",
        ),
    ]
    for extra, message in cases:
        args: dict[str, object] = {"sender": "kew@example.org"}
        args.update(extra)
        with pytest.raises(kew.ConfigError, match=message) as info:
            SmtpConfig(**args)  # type: ignore[arg-type]
        assert SECRET not in str(info.value)
    # The same checks apply to a config decoded from JSON or YAML-ish dicts.
    with pytest.raises(msgspec.ValidationError, match="port must be between"):
        msgspec.convert({"sender": "kew@example.org", "port": 0x10000}, SmtpConfig)
    allowed = SmtpConfig(
        sender="kew@example.org",
        security="none",
        username="u",
        password=SECRET,
        allow_plain_login=True,
    )
    assert allowed.port == 25


def test_password_never_in_repr() -> None:
    config = SmtpConfig(sender="kew@example.org", username="kew", password=SECRET)
    for text in (repr(config), str(config), f"{config}", repr([config]), repr(SmtpSender(config))):
        assert SECRET not in text
        assert "password='***'" in text
    assert "password=None" in repr(SmtpConfig(sender="kew@example.org"))
    assert config.password == SECRET  # still usable


def test_mail_validation() -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"to": []}, "at least one recipient"),
        ({"to": ["nobody"]}, r"to\[0\] 'nobody' is not an e-mail address"),
        ({"cc": ["a@b", "x y@z"]}, r"cc\[1\]"),
        ({"subject": "two\nlines"}, "subject must be one line"),
        ({"reply_to": "@"}, "reply_to"),
        ({"to": "ann@example.org"}, "to must be a list"),
    ]
    for kw, message in cases:
        with pytest.raises(kew.ConfigError, match=message):
            mail(**kw)
    with pytest.raises(msgspec.ValidationError, match="at least one recipient"):
        msgspec.json.decode(b'{"to": [], "subject": "s", "body": "b"}', type=Mail)
    m = msgspec.json.decode(b'{"to": ["a@example.org"], "subject": "s", "body": "b"}', type=Mail)
    assert m.recipients() == ["a@example.org"]


def test_message_is_well_formed() -> None:
    m = mail(
        cc=["cc@example.org"],
        bcc=["hidden@example.org"],
        reply_to="help@example.org",
        html="<p>hello</p>",
    )
    msg = build_message(m, "Kew <kew@example.org>", message_id="task 42")
    assert msg["Message-ID"] == "<task-42@example.org>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["To"] == "Ann <ann@example.org>"
    assert msg["Cc"] == "cc@example.org"
    assert msg["Bcc"] is None  # bcc only in the envelope
    assert msg["Reply-To"] == "help@example.org"
    assert msg.get_body(("html",)) is not None
    assert m.recipients() == ["ann@example.org", "cc@example.org", "hidden@example.org"]


# -- sending ---------------------------------------------------------------------


def test_plain_send() -> None:
    with SmtpServer() as server:
        config = SmtpConfig(
            sender="kew@example.org", host=server.host, port=server.port, security="none"
        )
        result = SmtpSender(config).send(
            mail(subject="Grüße", body="ünïcode body\n"), message_id="t1"
        )
        assert result.accepted == ["ann@example.org"]
        (got,) = server.wait_for(1)
        assert got["Subject"] == "Grüße"
        assert body_of(got) == "ünïcode body\n"
        assert server.envelopes == [("kew@example.org", ["ann@example.org"])]


def test_starttls_with_login(certs: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer(mode="starttls", certs=certs, users={"kew": SECRET}) as server:
        config = SmtpConfig(
            sender="kew@example.org",
            host=server.host,
            port=server.port,
            security="starttls",
            username="kew",
            password=SECRET,
            ca_file=certs["ca"],
            timeout=10,
        )
        SmtpSender(config).send(mail(body="over STARTTLS\n"))
        (got,) = server.wait_for(1)
        assert body_of(got) == "over STARTTLS\n"
        assert server.logins == ["kew"]
        assert SECRET not in raw_of(got)
    assert SECRET not in caplog.text


def test_smtps_with_login(certs: dict[str, str]) -> None:
    with SmtpServer(mode="ssl", certs=certs, users={"kew": SECRET}) as server:
        config = SmtpConfig(
            sender="kew@example.org",
            host=server.host,
            port=server.port,
            security="ssl",
            username="kew",
            password=SECRET,
            ca_file=certs["ca"],
            timeout=10,
        )
        SmtpSender(config).send(mail(body="over SMTPS\n"))
        assert body_of(server.wait_for(1)[0]) == "over SMTPS\n"
        assert server.logins == ["kew"]


def test_wrong_ca_is_refused_without_plain_text_fallback(
    certs: dict[str, str], other_ca: str
) -> None:
    modes: tuple[Literal["starttls", "ssl"], ...] = ("starttls", "ssl")
    for mode in modes:
        with SmtpServer(mode=mode, certs=certs, users={"kew": SECRET}) as server:
            config = SmtpConfig(
                sender="kew@example.org",
                host=server.host,
                port=server.port,
                security=mode,
                username="kew",
                password=SECRET,
                ca_file=other_ca,
                timeout=10,
            )
            with pytest.raises(MailTemporaryError, match="TLS certificate not trusted") as info:
                SmtpSender(config).send(mail())
            text = str(info.value)
            assert "never sent in clear" in text
            assert other_ca in text
            assert SECRET not in text
            assert info.value.__cause__ is None and info.value.__suppress_context__
            assert server.messages == [] and server.logins == []


def test_starttls_required_but_not_offered() -> None:
    with SmtpServer() as server:  # plain: no STARTTLS
        config = SmtpConfig(
            sender="kew@example.org", host=server.host, port=server.port, timeout=10
        )
        with pytest.raises(MailTemporaryError, match="does not offer STARTTLS"):
            SmtpSender(config).send(mail())
        assert server.messages == []


def test_wrong_password_is_permanent_and_not_shown(
    certs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer(mode="starttls", certs=certs, users={"kew": "the-right-one"}) as server:
        config = SmtpConfig(
            sender="kew@example.org",
            host=server.host,
            port=server.port,
            username="kew",
            password=SECRET,
            ca_file=certs["ca"],
            timeout=10,
        )
        with pytest.raises(MailPermanentError, match=r"login as 'kew' refused: 535") as info:
            SmtpSender(config).send(mail())
        assert info.value.code == 535
        assert SECRET not in str(info.value) and SECRET not in repr(info.value)
        assert server.messages == []
    assert SECRET not in caplog.text


def test_refusals_map_to_temporary_and_permanent() -> None:
    replies = {
        "temp@example.org": "451 4.3.0 try again later",
        "perm@example.org": "550 5.7.1 no thanks",
    }
    with SmtpServer(verdict=lambda env: replies.get(env.rcpt_tos[0])) as server:
        sender = SmtpSender(
            SmtpConfig(
                sender="kew@example.org", host=server.host, port=server.port, security="none"
            )
        )
        with pytest.raises(MailTemporaryError, match=r"451 4\.3\.0 try again later") as temp:
            sender.send(mail(to=["temp@example.org"]))
        assert temp.value.code == 451
        with pytest.raises(MailPermanentError, match=r"550 5\.7\.1 no thanks") as perm:
            sender.send(mail(to=["perm@example.org"]))
        assert perm.value.code == 550
        assert server.messages == []
        sender.send(mail(to=["fine@example.org"]))
        assert len(server.wait_for(1)) == 1


def test_no_server_is_temporary() -> None:
    port = free_port()  # nothing listens there
    sender = SmtpSender(
        SmtpConfig(sender="kew@example.org", host="127.0.0.1", port=port, timeout=5)
    )
    with pytest.raises(
        MailTemporaryError, match=rf"SMTP 127.0.0.1:{port} \(starttls\): connect failed"
    ):
        sender.send(mail())


def test_some_recipients_refused() -> None:
    replies = {"gone@example.org": "550 5.1.1 no such user", "full@example.org": "452 4.2.2 full"}
    with SmtpServer(rcpt_verdict=replies.get) as server:
        sender = SmtpSender(
            SmtpConfig(
                sender="kew@example.org", host=server.host, port=server.port, security="none"
            )
        )
        result = sender.send(
            mail(to=["ann@example.org", "gone@example.org"], cc=["full@example.org"])
        )
        assert result.accepted == ["ann@example.org"]
        assert result.refused == {
            "gone@example.org": (550, "5.1.1 no such user"),
            "full@example.org": (452, "4.2.2 full"),
        }
        assert server.wait_for(1) and server.envelopes[0][1] == ["ann@example.org"]
        with pytest.raises(
            MailPermanentError, match=r"every recipient refused: gone@example\.org: 550"
        ):
            sender.send(mail(to=["gone@example.org"]))
        with pytest.raises(MailTemporaryError, match="every recipient refused") as info:
            sender.send(mail(to=["gone@example.org"], cc=["full@example.org"]))
        assert info.value.code == 452


def test_system_cas_refuse_a_test_certificate_unless_verify_is_off(
    certs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with SmtpServer(mode="starttls", certs=certs) as server:
        base = {"sender": "kew@example.org", "host": server.host, "port": server.port}
        with pytest.raises(MailTemporaryError, match="checked against the system's CAs"):
            SmtpSender(SmtpConfig(**base, timeout=10)).send(mail())  # type: ignore[arg-type]
        assert server.messages == []
        caplog.set_level(logging.WARNING)
        unverified = SmtpSender(SmtpConfig(**base, timeout=10, verify=False))  # type: ignore[arg-type]
        assert "verification is OFF" in caplog.text
        unverified.send(mail(body="unverified but encrypted\n"))
        assert body_of(server.wait_for(1)[0]) == "unverified but encrypted\n"
