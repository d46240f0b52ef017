"""The SMTP side of :mod:`kew.task.mail`: how to reach the server
(:class:`SmtpConfig`), the errors of sending, the RFC 5322 message of a
:class:`~kew.task.mail.Mail` (:func:`build_message`) and the sender
(:class:`SmtpSender`).

Secrets: :class:`SmtpConfig` never shows its password in ``repr``, logs or
errors (errors are built by kew, never chained to smtplib's, and scrubbed
of the password and of its base64 forms that ``AUTH`` sends).  TLS is never
downgraded: ``starttls`` refuses a server that does not offer STARTTLS,
certificates are verified (against ``ca_file`` if given), and a login over an
unencrypted connection is refused unless explicitly allowed.

Private module: import these names from :mod:`kew.task.mail`.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import os
import re
import smtplib
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from kew.qchan.spi import ConfigError, KewError

if TYPE_CHECKING:
    from kew.task.mail import Mail

log = logging.getLogger("kew.mail")

#: How the connection to the SMTP server is secured.
Security = Literal["none", "starttls", "ssl"]
#: The values of :data:`Security`.
SECURITIES: tuple[str, ...] = ("none", "starttls", "ssl")
#: The port used when ``SmtpConfig.port`` is 0, by security.
DEFAULT_PORTS: Mapping[str, int] = {"none": 25, "starttls": 587, "ssl": 465}

_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+$")


def check_address(value: object, what: str) -> str:
    """``value`` as an address (``a@b`` or ``Name <a@b>``), or ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    if "\r" in value or "\n" in value:
        raise ConfigError(f"{what} {value!r} contains a line break")
    _, address = email.utils.parseaddr(value)
    if not address or not _ADDRESS.match(address):
        raise ConfigError(f"{what} {value!r} is not an e-mail address (expected name@domain)")
    return value


def check_addresses(values: object, what: str) -> None:
    """``values`` as a list of addresses (see :func:`check_address`), or ConfigError."""
    if not isinstance(values, list):
        raise ConfigError(f"{what} must be a list of addresses, not {type(values).__name__}")
    for i, v in enumerate(values):
        check_address(v, f"{what}[{i}]")


class SmtpConfig(msgspec.Struct, kw_only=True):
    """How to reach the SMTP server.

    ``security``: ``"starttls"`` (default; port 587), ``"ssl"`` (SMTPS, implicit
    TLS; port 465) or ``"none"`` (plain text; port 25).  ``port`` 0 means the
    default port of the security.  ``ca_file``: PEM file of the CA(s) to trust
    instead of the system's; ``verify=False`` disables certificate checks (a
    warning is logged; not for production).  ``username``/``password`` log in
    (after TLS is up); over ``security="none"`` that would send the password
    in clear, which is refused unless ``allow_plain_login=True``.
    ``sender`` is the From address of every mail.

    The password never appears in ``repr``, logs or errors.
    """

    sender: str
    host: str = "localhost"
    port: int = 0
    security: Security = "starttls"
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    ca_file: str | None = None
    verify: bool = True
    allow_plain_login: bool = False
    local_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.security not in SECURITIES:
            raise ConfigError(
                f"security must be one of {', '.join(SECURITIES)}, not {self.security!r}"
            )
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"host must be a host name or address, not {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"port must be an integer, not {self.port!r}")
        if self.port == 0:
            self.port = DEFAULT_PORTS[self.security]
        if not 1 <= self.port <= 65535:
            raise ConfigError(
                f"port must be between 1 and 65535 (or 0 for the default), not {self.port}"
            )
        check_address(self.sender, "sender")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise ConfigError(f"timeout must be a number of seconds, not {self.timeout!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive, not {self.timeout!r}")
        if (self.username is None) != (self.password is None):
            raise ConfigError("username and password go together: give both or neither")
        if self.username is not None and self.security == "none" and not self.allow_plain_login:
            raise ConfigError(
                "login over security='none' would send the password in clear; use "
                "security='starttls' or 'ssl' (or allow_plain_login=True on a trusted network)"
            )
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ConfigError(f"ca_file {self.ca_file!r} is not a readable file")

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return "SmtpConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._public_fields()) + ")"

    __str__ = __repr__

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return list(self._public_fields())

    def _public_fields(self) -> Iterator[tuple[str, object]]:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "password":
                yield name, None if value is None else "***"
            else:
                yield name, value

    def secret_forms(self) -> list[str]:
        """The password and the base64 forms in which SMTP AUTH sends it:
        what :func:`scrub` hides."""
        if not self.password:
            return []
        pw, user = self.password, self.username or ""
        forms = [pw]
        for raw in (pw, f"\0{user}\0{pw}", f"{user}\0{user}\0{pw}"):
            forms.append(base64.b64encode(raw.encode()).decode("ascii"))
        return forms

    def scrub(self, text: str) -> str:
        """``text`` with the password (and its AUTH forms) replaced by ``***``."""
        for secret in sorted(self.secret_forms(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


# -- errors -------------------------------------------------------------------


class MailError(KewError):
    """Sending a mail failed.  ``code`` is the SMTP reply code if there was one."""

    temporary: bool = True

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MailTemporaryError(MailError):
    """Worth retrying: a 4xx reply, no connection, a timeout, a TLS failure."""

    temporary = True


class MailPermanentError(MailError):
    """Not worth retrying: the server said no for good (a 5xx reply)."""

    temporary = False


def _reply_text(resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", errors="replace")
    return " ".join(resp.split())


def _by_code(code: int, message: str) -> MailError:
    if 500 <= code < 600:
        return MailPermanentError(message, code)
    return MailTemporaryError(message, code)


def _translate(e: BaseException, config: SmtpConfig, stage: str) -> MailError:
    """A kew error for an smtplib/ssl/socket exception, scrubbed, naming the
    server and what was being done."""
    where = f"SMTP {config.address} ({config.security})"
    err: MailError
    if isinstance(e, MailError):
        err = e
    elif isinstance(e, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in e.recipients.values()]
        detail = "; ".join(
            f"{rcpt}: {code} {_reply_text(msg)}" for rcpt, (code, msg) in e.recipients.items()
        )
        cls = MailPermanentError if all(500 <= c < 600 for c in codes) else MailTemporaryError
        err = cls(f"{where}: every recipient refused: {detail}", min(codes) if codes else None)
    elif isinstance(e, smtplib.SMTPSenderRefused):
        err = _by_code(
            e.smtp_code,
            f"{where}: sender {e.sender} refused: {e.smtp_code} {_reply_text(e.smtp_error)}",
        )
    elif isinstance(e, smtplib.SMTPAuthenticationError):
        err = _by_code(
            e.smtp_code,
            f"{where}: login as {config.username!r} refused: "
            f"{e.smtp_code} {_reply_text(e.smtp_error)}",
        )
    elif isinstance(e, smtplib.SMTPResponseException):
        err = _by_code(
            e.smtp_code, f"{where}: {stage} refused: {e.smtp_code} {_reply_text(e.smtp_error)}"
        )
    elif isinstance(e, ssl.SSLCertVerificationError):
        trust = f"ca_file {config.ca_file!r}" if config.ca_file else "the system's CAs"
        err = MailTemporaryError(
            f"{where}: TLS certificate not trusted ({e.verify_message or e.reason}; checked "
            f"against {trust}); not sent, and never sent in clear instead"
        )
    elif isinstance(e, ssl.SSLError):
        err = MailTemporaryError(
            f"{where}: TLS failed during {stage}: {e}; not sent, and never sent in clear instead"
        )
    elif isinstance(e, smtplib.SMTPServerDisconnected):
        err = MailTemporaryError(f"{where}: server closed the connection during {stage}: {e}")
    elif isinstance(e, smtplib.SMTPNotSupportedError):
        err = MailTemporaryError(f"{where}: {stage}: {e}")
    elif isinstance(e, TimeoutError):
        err = MailTemporaryError(f"{where}: timed out after {config.timeout}s during {stage}")
    elif isinstance(e, OSError | smtplib.SMTPException):
        err = MailTemporaryError(f"{where}: {stage} failed: {type(e).__name__}: {e}")
    else:
        raise e
    scrubbed = config.scrub(str(err))
    if scrubbed != str(err):
        err = type(err)(scrubbed, err.code)
    return err


# -- sending ------------------------------------------------------------------


def build_message(
    mail: Mail,
    sender: str,
    *,
    message_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> EmailMessage:
    """The RFC 5322 message for ``mail`` from ``sender``.

    ``message_id`` makes the Message-ID stable (the mail queue uses the task
    id, so a mail sent twice after a crash is recognisably the same mail).
    The message is marked ``Auto-Submitted: auto-generated`` (RFC 3834) so
    that auto-responders do not answer it.
    """
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = ", ".join(mail.to)
    if mail.cc:
        msg["Cc"] = ", ".join(mail.cc)
    if mail.reply_to:
        msg["Reply-To"] = mail.reply_to
    msg["Subject"] = mail.subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or "kew"
    if message_id:
        safe = re.sub(r"[^A-Za-z0-9._-]", "-", message_id)
        msg["Message-ID"] = f"<{safe}@{domain}>"
    else:
        msg["Message-ID"] = email.utils.make_msgid("kew", domain)
    msg["Auto-Submitted"] = "auto-generated"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(mail.body)
    if mail.html is not None:
        msg.add_alternative(mail.html, subtype="html")
    return msg


@dataclass(frozen=True)
class SendResult:
    """What the server accepted: ``refused`` maps the recipients it refused
    (while accepting others) to their SMTP code and reply."""

    accepted: list[str]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class SmtpSender:
    """Sends :class:`Mail` with smtplib, one connection per mail.

    Raises :class:`MailTemporaryError` or :class:`MailPermanentError`, never
    smtplib's own errors, and never anything that shows the password.
    """

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._context: ssl.SSLContext | None = None
        if config.security != "none" and not config.verify:
            log.warning(
                "kew.mail: TLS certificate verification is OFF for SMTP %s (verify=False)",
                config.address,
            )

    def __repr__(self) -> str:
        return f"SmtpSender({self.config!r})"

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of this sender (made once): the system's CAs or
        ``ca_file``, verification off only if ``verify=False``."""
        if self._context is None:
            ctx = ssl.create_default_context(cafile=self.config.ca_file)
            if not self.config.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._context = ctx
        return self._context

    def _connect(self) -> smtplib.SMTP:
        c = self.config
        stage = "connect"
        smtp: smtplib.SMTP | None = None
        try:
            if c.security == "ssl":
                smtp = smtplib.SMTP_SSL(
                    c.host, c.port, c.local_hostname, timeout=c.timeout, context=self.ssl_context()
                )
            else:
                smtp = smtplib.SMTP(c.host, c.port, c.local_hostname, timeout=c.timeout)
            stage = "EHLO"
            smtp.ehlo()
            if c.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise MailTemporaryError(
                        f"SMTP {c.address} (starttls): the server does not offer STARTTLS; "
                        "not sent, and never sent in clear instead"
                    )
                stage = "STARTTLS"
                smtp.starttls(context=self.ssl_context())
                stage = "EHLO"
                smtp.ehlo()
            if c.username is not None and c.password is not None:
                stage = "login"
                smtp.login(c.username, c.password)
            return smtp
        except BaseException as e:
            if smtp is not None:
                _close(smtp)
            if isinstance(e, Exception):
                raise _translate(e, c, stage) from None
            raise

    def send(self, mail: Mail, *, message_id: str | None = None) -> SendResult:
        """Send ``mail``; returns once the server accepted it for at least
        one recipient."""
        c = self.config
        message = build_message(mail, c.sender, message_id=message_id)
        recipients = mail.recipients()
        sender = email.utils.parseaddr(c.sender)[1]
        smtp = self._connect()
        try:
            try:
                refused = smtp.send_message(message, sender, recipients)
            except Exception as e:
                raise _translate(e, c, "send") from None
            with contextlib.suppress(Exception):  # accepted already: a messy goodbye is fine
                smtp.quit()
        finally:
            _close(smtp)
        refused_out = {r: (code, c.scrub(_reply_text(msg))) for r, (code, msg) in refused.items()}
        accepted = [r for r in recipients if r not in refused_out]
        log.debug(
            "kew.mail: sent %r to %d recipient(s) via %s (%d refused)",
            mail.subject,
            len(accepted),
            c.address,
            len(refused_out),
        )
        return SendResult(accepted, refused_out)


def _close(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        smtp.close()
