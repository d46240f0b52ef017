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

The module is the public face of three parts: :mod:`kew.task._smtp` (the
SMTP client: :class:`SmtpConfig`, :class:`SmtpSender`, the errors),
:mod:`kew.task._templates` (the outcome mails' templates and their
rendering) and, here, the :class:`Mail` message, the mail queue
(:func:`mail_queue`) and the notifier (:class:`MailNotifier`).  Import all
of them from here.

See docs/mail.md.
"""

from __future__ import annotations

import email.utils
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec

from kew.qchan.spi import ConfigError
from kew.task._smtp import (
    DEFAULT_PORTS,
    SECURITIES,
    MailError,
    MailPermanentError,
    MailTemporaryError,
    Security,
    SendResult,
    SmtpConfig,
    SmtpSender,
    build_message,
    check_address,
    check_addresses,
)
from kew.task._templates import (
    DEFAULT_BODY,
    DEFAULT_SUBJECTS,
    MAX_ERROR_CHARS,
    OUTCOME_KINDS,
    TEMPLATE_FIELDS,
    check_template,
    one_line,
    outcome_fields,
    render,
    scrub_text,
)
from kew.task.model import Outcome

if TYPE_CHECKING:
    from kew.task.app import App, TaskQueue
    from kew.task.retry import RetryPolicy

__all__ = [
    "DEFAULT_BODY",
    "DEFAULT_MAIL_INTERVALS",
    "DEFAULT_MAIL_QUEUE",
    "DEFAULT_PORTS",
    "DEFAULT_SUBJECTS",
    "MAX_ERROR_CHARS",
    "OUTCOME_KINDS",
    "SECURITIES",
    "TEMPLATE_FIELDS",
    "Mail",
    "MailError",
    "MailNotifier",
    "MailPermanentError",
    "MailTemporaryError",
    "Security",
    "SendResult",
    "SmtpConfig",
    "SmtpSender",
    "build_message",
    "check_template",
    "mail_queue",
    "one_line",
    "outcome_fields",
    "render",
    "scrub_text",
]

T = TypeVar("T")
log = logging.getLogger("kew.mail")


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
        check_addresses(self.to, "to")
        if not self.to:
            raise ConfigError("to: a mail needs at least one recipient")
        check_addresses(self.cc, "cc")
        check_addresses(self.bcc, "bcc")
        check_addresses(self.envelope, "envelope")
        if self.reply_to is not None:
            check_address(self.reply_to, "reply_to")
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


# -- the mail queue ------------------------------------------------------------------

#: The name of the mail queue.
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
        check_addresses(admins, "admin")
        self.admins = admins
        if reply_to is not None:
            check_address(reply_to, "reply_to")
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
            return check_address(address, "requester")
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
