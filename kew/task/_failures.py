"""What the task layer logs of a failure, and the dead letters it records
(the admission policy's: poison cap, decode)."""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Sequence

from kew.qchan.spi import Consumer, Delivery
from kew.task.errors import Permanent, Retry

__all__ = ["RecordingDeadLetters", "error_text", "log_failure", "logged", "scrub"]

log = logging.getLogger("kew.task")


def error_text(e: BaseException) -> str:
    """A task's ``last_error`` (and dead-letter reason) for what its
    handler raised: the message of a Permanent or Retry, else type and
    message."""
    text = str(e)
    if isinstance(e, (Permanent, Retry)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# A secret-looking ``name=value`` / ``name: value``, and a URL's password.
_SECRET_PAIR = re.compile(
    r"(?i)\b((?:pass(?:word|wd|code)?|secret|token|session[ _-]?key|api[ _-]?key|"
    r"credentials?)\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&)\]}'\"]+)"
)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s/@]+@", re.I)


def scrub(text: str) -> str:
    """``text`` for a log line: the values of secret-looking pairs
    (``password=...``, ``token: ...``) and URL passwords as ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", _SECRET_PAIR.sub(r"\1***", text))


def logged(e: BaseException) -> str:
    """What a log line says of an exception: its type and its message."""
    text = str(e)
    return scrub(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def log_failure(level: int, message: str, *args: object, error: BaseException | None) -> None:
    """One log line for a failure, with the traceback only when DEBUG is
    on (as :func:`kew.qchan.policy.log_failure`), scrubbed like the line:
    a handler's exception message may hold what it should not."""
    if error is not None and log.isEnabledFor(logging.DEBUG):
        message += "\n%s"
        args += (scrub("".join(traceback.format_exception(error)).rstrip()),)
    log.log(level, message, *args)


class RecordingDeadLetters:
    """A consumer whose dead letters (the admission policy's: poison cap,
    decode) are also recorded as failed tasks."""

    def __init__(self, consumer: Consumer, record: Callable[[Delivery, str], None]) -> None:
        self._consumer = consumer
        self._record = record

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        return self._consumer.fetch(max_count, timeout)

    def ack(self, delivery: Delivery) -> None:
        self._consumer.ack(delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._consumer.dead_letter(delivery, reason)
        self._record(delivery, reason)

    def release(self, delivery: Delivery) -> None:
        self._consumer.release(delivery)

    def close(self) -> None:
        self._consumer.close()
