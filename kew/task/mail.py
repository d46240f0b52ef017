"""Outcome e-mail: a mail queue with retries and a dead-mail store, an SMTP
sender (STARTTLS, SMTPS, login) and a notifier that tells a task's requester
how it ended and the administrator about permanent failures.

Mail is itself a kew task queue (``kew.mail`` by default) of :class:`Mail`
values, so sending is decoupled from the task that asked for it: a mail
server that is down delays mail, it does not fail tasks.  A temporary SMTP
failure (a 4xx reply, a refused or cut connection, a TLS failure) is retried
on the queue's retry policy; a permanent one (a 5xx reply) is not.  Either
way, a mail that could not be sent stays in the mail queue's dead letters:
that is the dead-mail store, listed and requeued like any dead letters
(``kew dead list kew.mail``, ``mail.queue.dead.requeue()``).

Secrets: :class:`SmtpConfig` never shows its password in ``repr``, logs or
errors (errors are built by kew, never chained to smtplib's, and scrubbed
of the password and of its base64 forms that ``AUTH`` sends).  TLS is never
downgraded: ``starttls`` refuses a server that does not offer STARTTLS,
certificates are verified (against ``ca_file`` if given), and a login over an
unencrypted connection is refused unless explicitly allowed.

See docs/mail.md.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import logging
import os
import re
import smtplib
import ssl
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

from kew.qchan.spi import ConfigError, KewError
from kew.task.model import Outcome

if TYPE_CHECKING:
    from kew.task.app import App, TaskQueue
    from kew.task.retry import RetryPolicy

__all__ = [
    "DEFAULT_PORTS",
    "Mail",
    "MailError",
    "MailPermanentError",
    "MailTemporaryError",
    "SendResult",
    "SmtpConfig",
    "SmtpSender",
    "build_message",
]

T = TypeVar("T")
log = logging.getLogger("kew.mail")

Security = Literal["none", "starttls", "ssl"]
SECURITIES: tuple[str, ...] = ("none", "starttls", "ssl")
#: The port used when ``SmtpConfig.port`` is 0, by security.
DEFAULT_PORTS: Mapping[str, int] = {"none": 25, "starttls": 587, "ssl": 465}

_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+$")


def _check_address(value: object, what: str) -> str:
    """``value`` as an address (``a@b`` or ``Name <a@b>``), or ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    if "\r" in value or "\n" in value:
        raise ConfigError(f"{what} {value!r} contains a line break")
    _, address = email.utils.parseaddr(value)
    if not address or not _ADDRESS.match(address):
        raise ConfigError(f"{what} {value!r} is not an e-mail address (expected name@domain)")
    return value


def _check_addresses(values: object, what: str) -> None:
    if not isinstance(values, list):
        raise ConfigError(f"{what} must be a list of addresses, not {type(values).__name__}")
    for i, v in enumerate(values):
        _check_address(v, f"{what}[{i}]")


class Mail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One e-mail, the message type of the mail queue (plain JSON on the
    wire: ``{"to": ["a@example.org"], "subject": "...", "body": "..."}``).

    ``body`` is plain text; ``html``, if given, is sent as an alternative
    part.  ``envelope``, if given, are the addresses actually sent to
    (instead of to, cc and bcc; the headers stay as they are): the mail
    queue uses it to resend a mail to the recipients a server refused for
    the moment, and to them only.  Addresses are ``name@domain`` or ``Name <name@domain>``.  Invalid
    values raise :class:`~kew.ConfigError` (a ``ValueError``) when built, and
    make a message on the queue a dead letter with the reason when consumed.
    """

    to: list[str]
    subject: str
    body: str
    cc: list[str] = []
    bcc: list[str] = []
    reply_to: str | None = None
    html: str | None = None
    envelope: list[str] = []

    def __post_init__(self) -> None:
        _check_addresses(self.to, "to")
        if not self.to:
            raise ConfigError("to: a mail needs at least one recipient")
        _check_addresses(self.cc, "cc")
        _check_addresses(self.bcc, "bcc")
        _check_addresses(self.envelope, "envelope")
        if self.reply_to is not None:
            _check_address(self.reply_to, "reply_to")
        if not isinstance(self.subject, str) or "\r" in self.subject or "\n" in self.subject:
            raise ConfigError(f"subject must be one line of text, not {self.subject!r}")
        if not isinstance(self.body, str):
            raise ConfigError(f"body must be text, not {type(self.body).__name__}")
        if self.html is not None and not isinstance(self.html, str):
            raise ConfigError(f"html must be text, not {type(self.html).__name__}")

    def recipients(self) -> list[str]:
        """The envelope recipients, as bare addresses: ``envelope`` if
        given, else to, cc and bcc."""
        chosen = self.envelope or [*self.to, *self.cc, *self.bcc]
        return list(dict.fromkeys(email.utils.parseaddr(a)[1] for a in chosen))


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
        _check_address(self.sender, "sender")
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


# -- outcome mails ----------------------------------------------------------------

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


# -- the mail queue ------------------------------------------------------------------

DEFAULT_MAIL_QUEUE = "kew.mail"
#: Seconds between attempts of the mail queue: 1, 5, 30, 120 and 480 minutes.
DEFAULT_MAIL_INTERVALS: tuple[float, ...] = (60.0, 300.0, 1800.0, 7200.0, 28800.0)


def _scrub_mail(mail: Mail, secrets: Iterable[str]) -> Mail:
    forms = list(secrets)
    if not forms:
        return mail
    subject = scrub_text(mail.subject, forms)
    body = scrub_text(mail.body, forms)
    html = scrub_text(mail.html, forms) if mail.html is not None else None
    if (subject, body, html) == (mail.subject, mail.body, mail.html):
        return mail
    return msgspec.structs.replace(mail, subject=subject, body=body, html=html)


def _only(mail: Mail, recipients: set[str]) -> Mail:
    """``mail`` as it is, to be delivered only to ``recipients`` (its
    headers unchanged: a partial resend of the same mail)."""
    return msgspec.structs.replace(mail, envelope=[r for r in mail.recipients() if r in recipients])


def mail_queue(
    app: App,
    config: SmtpConfig,
    *,
    name: str = DEFAULT_MAIL_QUEUE,
    retry: RetryPolicy | None = None,
    concurrency: int | None = None,
    notify: bool = False,
) -> TaskQueue[Mail]:
    """Declare the mail queue on ``app``: a task queue of :class:`Mail` that
    sends each over SMTP with ``config``.

    Temporary failures (4xx, no connection, TLS) are retried on ``retry``
    (default: :data:`DEFAULT_MAIL_INTERVALS`); permanent ones (5xx) are not.
    A mail that fails for good stays in the queue's dead letters (the
    dead-mail store), with the reason.
    """
    from kew.task.context import current
    from kew.task.errors import Permanent, Retry
    from kew.task.retry import Intervals

    if not isinstance(config, SmtpConfig):
        raise ConfigError(f"config must be an SmtpConfig, not {type(config).__name__}")
    sender = SmtpSender(config)
    policy: RetryPolicy = retry if retry is not None else Intervals(DEFAULT_MAIL_INTERVALS)
    secrets = config.secret_forms()
    holder: list[TaskQueue[Mail]] = []

    def send(mail: Mail) -> None:
        ctx = current()
        mail = _scrub_mail(mail, secrets)
        try:
            result = sender.send(mail, message_id=ctx.id)
        except MailPermanentError as e:
            raise Permanent(str(e)) from None
        except MailTemporaryError as e:
            raise Retry(str(e)) from None
        ctx.log(f"sent via {config.address} to {', '.join(result.accepted)}")
        if result.refused:
            for rcpt, (code, reply) in result.refused.items():
                ctx.log(f"refused by the server: {rcpt}: {code} {reply}")
            again = {r for r, (code, _) in result.refused.items() if not 500 <= code < 600}
            if again:
                first = policy.delay(1)
                follow_up = holder[0].submit(
                    _only(mail, again), delay=60.0 if first is None else first
                )
                ctx.log(f"mail task {follow_up} retries {', '.join(sorted(again))}")

    tq = app.task_queue(
        name,
        Mail,
        send,
        retry=policy,
        notify=notify,
        concurrency=concurrency,
    )
    holder.append(tq)
    return tq


# -- the notifier ---------------------------------------------------------------------

OUTCOME_KINDS: tuple[str, ...] = ("succeeded", "failed", "attempt-failed")


class MailNotifier(Generic[T]):
    """Tells a task's requester how it ended, and the administrator about
    permanent failures, by putting :class:`Mail` on the mail queue.

    Registers a consumer of ``task_queue.outcomes`` on ``app`` (declare the
    task queue with ``notify=True``), which ``kew worker`` runs.  See
    docs/mail.md for the templates and their variables.
    """

    def __init__(
        self,
        app: App,
        task_queue: TaskQueue[T],
        mail: TaskQueue[Mail],
        *,
        requester: Callable[[T], str | None],
        admin: str | Sequence[str] | None = None,
        subjects: Mapping[str, str | Callable[[Outcome[T]], str]] | None = None,
        body: str | Callable[[Outcome[T]], str] = DEFAULT_BODY,
        admin_subjects: Mapping[str, str | Callable[[Outcome[T]], str]] | None = None,
        admin_body: str | Callable[[Outcome[T]], str] | None = None,
        notify_attempts: bool = False,
        base_url: str | None = None,
        status_url: str | None = None,
        secrets: Callable[[T], Iterable[str]] | None = None,
        reply_to: str | None = None,
        concurrency: int = 1,
    ) -> None:
        outcomes = task_queue.outcomes
        if outcomes is None:
            raise ConfigError(
                f"task queue {task_queue.name!r} has no outcomes queue: declare it with notify=True"
            )
        self.app = app
        self.task_queue = task_queue
        self.mail = mail
        self.requester = requester
        admins = [admin] if isinstance(admin, str) else list(admin or [])
        _check_addresses(admins, "admin")
        self.admins = admins
        if reply_to is not None:
            _check_address(reply_to, "reply_to")
        self.reply_to = reply_to
        for what, given in (("subjects", subjects), ("admin_subjects", admin_subjects)):
            for kind in given or {}:
                if kind not in OUTCOME_KINDS:
                    raise ConfigError(
                        f"{what}: unknown outcome kind {kind!r}; kinds: {', '.join(OUTCOME_KINDS)}"
                    )
        self.subjects: dict[str, str | Callable[[Outcome[T]], str]] = {
            **DEFAULT_SUBJECTS,
            **(subjects or {}),
        }
        self.admin_subjects: dict[str, str | Callable[[Outcome[T]], str]] = {
            **self.subjects,
            **(admin_subjects or {}),
        }
        self.body = body
        self.admin_body = admin_body if admin_body is not None else body
        for kind in OUTCOME_KINDS:
            check_template(self.subjects[kind], f"subjects[{kind!r}]")
            check_template(self.admin_subjects[kind], f"admin_subjects[{kind!r}]")
        check_template(self.body, "body")
        check_template(self.admin_body, "admin_body")
        if base_url is not None and not re.match(r"^https?://\S+$", base_url):
            raise ConfigError(f"base_url must be an http(s) URL, not {base_url!r}")
        if status_url is not None and "{task_id}" not in status_url:
            raise ConfigError(f"status_url must contain {{task_id}}: {status_url!r}")
        self.base_url = base_url
        self.status_url = status_url
        self.notify_attempts = notify_attempts
        self.secrets = secrets
        app.consumer(outcomes, self.handle, concurrency=concurrency)

    def __repr__(self) -> str:
        return f"MailNotifier({self.task_queue.name!r} -> {self.mail.name!r}, admin={self.admins})"

    def _requester(self, data: T, task_id: str) -> str | None:
        try:
            address = self.requester(data)
        except Exception as e:
            log.warning(
                "kew.mail: requester() failed for task %s: %s: %s", task_id, type(e).__name__, e
            )
            return None
        if address is None or address == "":
            return None
        try:
            return _check_address(address, "requester")
        except ConfigError as e:
            log.warning("kew.mail: task %s: not mailing the requester: %s", task_id, e)
            return None

    def mails(self, outcome: Outcome[T]) -> list[tuple[str, Mail]]:
        """The mails for ``outcome``, each with its fixed mail task id."""
        requester = self._requester(outcome.data, outcome.task_id)
        to_requester = requester is not None and (
            outcome.kind != "attempt-failed" or self.notify_attempts
        )
        to_admin = bool(self.admins) and outcome.kind == "failed"
        if not (to_requester or to_admin):
            return []
        fields = outcome_fields(
            outcome, app=self.app.name, base_url=self.base_url, requester=requester
        )
        if self.status_url is not None:
            url = self.status_url.replace("{task_id}", outcome.task_id)
            fields["status_url"] = url
            fields["status_block"] = f"\nStatus and output: {url}\n"
        secrets: list[str] = []
        if self.secrets is not None:
            secrets = [s for s in self.secrets(outcome.data) if isinstance(s, str)]
        stem = f"{outcome.task_id}-{outcome.kind}-{outcome.attempt}"
        out: list[tuple[str, Mail]] = []

        def make(
            to: list[str],
            subject: str | Callable[[Outcome[T]], str],
            body: str | Callable[[Outcome[T]], str],
        ) -> Mail:
            return Mail(
                to=to,
                subject=one_line(scrub_text(render(subject, outcome, fields), secrets)),
                body=scrub_text(render(body, outcome, fields), secrets),
                reply_to=self.reply_to,
            )

        if to_requester and requester is not None:
            out.append(
                (f"{stem}-requester", make([requester], self.subjects[outcome.kind], self.body))
            )
        if to_admin:
            out.append(
                (
                    f"{stem}-admin",
                    make(self.admins, self.admin_subjects[outcome.kind], self.admin_body),
                )
            )
        return out

    def handle(self, outcome: Outcome[T]) -> None:
        """Queue the mails of ``outcome`` (the outcomes consumer)."""
        for mail_id, m in self.mails(outcome):
            self.mail.submit(m, id=mail_id)
