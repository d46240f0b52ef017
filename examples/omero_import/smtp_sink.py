"""A local SMTP server that keeps what it receives (the demo's and tests'
mail sink): a real aiosmtpd server on loopback, no mock."""

from __future__ import annotations

import email
import email.policy
import threading
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self._sink.lock:
            self._sink.messages.append(msg)
            self._sink.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


class SmtpSink:
    """``with SmtpSink() as sink: ... sink.messages``"""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if port == 0:
            from kew.testing.util import free_port

            port = free_port()
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._controller = Controller(_Handler(self), hostname=host, port=port)

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def received(self) -> list[EmailMessage]:
        with self.lock:
            return list(self.messages)

    def wait(self, count: int, timeout: float = 60.0) -> list[EmailMessage]:
        """At least ``count`` messages received (AssertionError on timeout)."""
        from kew.testing.util import wait_for

        wait_for(lambda: len(self.received()) >= count, timeout, what=f"{count} e-mail(s)")
        return self.received()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def text_of(msg: EmailMessage) -> str:
    """The plain-text body of a message."""
    part = msg.get_body(preferencelist=("plain",))
    return "" if part is None else str(part.get_content())
