"""A real SMTP server on loopback for tests: aiosmtpd in a thread, on a free
port, optionally with STARTTLS or implicit TLS (SMTPS) on a test-made
certificate and with login.  It records every message it accepts; a
``verdict`` function can make it refuse (``"451 ..."``, ``"550 ..."``).

    with SmtpServer() as smtp:
        ...
        smtp.wait_for(1)
        assert smtp.messages[0]["Subject"] == "..."
"""

from __future__ import annotations

import email
import email.policy
import logging
import ssl
import threading
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from kew.testing.util import free_port, wait_for

# The server's own debug log shows AUTH exchanges; it is the test's server,
# not kew, so keep it out of the logs a secrets test inspects.
logging.getLogger("mail.log").setLevel(logging.WARNING)

#: For test modules: aiosmtpd warns "Requiring AUTH while not requiring TLS"
#: for the SMTPS server, whose whole connection is TLS already.
IGNORE_AUTH_WARNING = "ignore:Requiring AUTH while not requiring TLS:UserWarning"

Verdict = Callable[[Envelope], "str | None"]


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self._server = server

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        return self._server._data(envelope)

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        refuse = self._server.rcpt_verdict(address) if self._server.rcpt_verdict else None
        if refuse:
            return refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"


class SmtpServer:
    """``mode``: "plain", "starttls" (STARTTLS offered, required before
    MAIL and before AUTH) or "ssl" (implicit TLS).  ``certs``: paths from
    tests.brokers.tls.make_certs.  ``users``: login -> password; when given,
    login is required.  ``verdict(envelope)`` may refuse a whole mail at DATA,
    ``rcpt_verdict(address)`` one recipient at RCPT (return the reply)."""

    def __init__(
        self,
        *,
        mode: Literal["plain", "starttls", "ssl"] = "plain",
        certs: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        verdict: Verdict | None = None,
        rcpt_verdict: Callable[[str], str | None] | None = None,
    ) -> None:
        self.mode = mode
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users
        self.verdict = verdict
        self.rcpt_verdict = rcpt_verdict
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.refusals: list[str] = []
        self.logins: list[str] = []
        self._lock = threading.Lock()
        kwargs: dict[str, Any] = {}
        ssl_context = None
        if mode != "plain":
            assert certs, "TLS modes need certs"
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certs["cert"], certs["key"])
            if mode == "starttls":
                kwargs.update(tls_context=ctx, require_starttls=True)
            else:
                ssl_context = ctx
        if users is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                # Over implicit TLS the transport is encrypted already.
                auth_require_tls=mode == "starttls",
            )
        self._controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            ssl_context=ssl_context,
            **kwargs,
        )

    def _authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.users is not None
            and self.users.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        if ok:
            with self._lock:
                self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    def _data(self, envelope: Envelope) -> str:
        verdict = self.verdict(envelope) if self.verdict else None
        if verdict:
            with self._lock:
                self.refusals.append(verdict)
            return verdict
        raw = envelope.original_content or envelope.content or b""
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self._lock:
            self.messages.append(msg)
            self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 OK"

    def start(self) -> SmtpServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[EmailMessage]:
        """Wait until at least ``n`` messages arrived; return them all."""
        wait_for(lambda: len(self.messages) >= n, timeout, what=f"{n} mail(s) on the SMTP server")
        with self._lock:
            return list(self.messages)

    def to(self, address: str) -> list[EmailMessage]:
        """The messages whose envelope included ``address``."""
        with self._lock:
            return [
                m
                for m, (_, rcpts) in zip(self.messages, self.envelopes, strict=True)
                if address in rcpts
            ]


def body_of(msg: EmailMessage) -> str:
    """The plain-text body of a received message."""
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None, "no text/plain part"
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def raw_of(msg: EmailMessage) -> str:
    """The whole message as text (headers and every part, decoded)."""
    out = [f"{k}: {v}" for k, v in msg.items()]
    for part in msg.walk():
        if not part.is_multipart():
            content = part.get_content()
            out.append(content if isinstance(content, str) else repr(content))
    return "\n".join(out)
