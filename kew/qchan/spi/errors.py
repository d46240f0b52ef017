"""kew's errors. Every one names the problem; none carries a credential."""

from __future__ import annotations


class KewError(Exception):
    """Base of every error kew raises on purpose."""


class ConfigError(KewError, ValueError):
    """A URL, option or configuration value is wrong; start-up should stop."""


class ProviderNotFound(ConfigError):
    """No provider is registered for a URL scheme, or its extra is missing."""


class BrokerUnavailable(KewError, ConnectionError):
    """The broker could not be reached within the retry budget."""


class AccessRefused(KewError, PermissionError):
    """The broker refused the credentials or the permission (wrong user or
    password, unknown or forbidden vhost, ACL).  Final: kew never retries
    it, and the message names what was refused, never the password."""


class ConsumerFailed(KewError):
    """A consumer can no longer deliver and will not recover by itself (its
    I/O thread died, its subscription was refused for good).  ``fetch``
    raises it; the runtime marks the subscription failed (``alive`` is
    False, ``error`` says why) so that a supervisor can restart the process.
    A passing outage raises :class:`BrokerUnavailable` instead."""


class SendError(KewError):
    """The broker refused or did not confirm a send (nack, return, timeout).

    The message may or may not be stored: resend it.
    """


class MessageTooLarge(KewError, ValueError):
    """A body is larger than the provider's (or queue's) maximum."""

    def __init__(self, size: int, limit: int, queue: str = "") -> None:
        where = f" on queue {queue!r}" if queue else ""
        super().__init__(
            f"message of {size} bytes is larger than the maximum of {limit} bytes{where}"
        )
        self.size = size
        self.limit = limit


class QueueFull(KewError):
    """A queue is at its maximum depth; the producer should back off."""

    def __init__(self, queue: str, depth: int, limit: int) -> None:
        super().__init__(f"queue {queue!r} is full: {depth} messages, limit {limit}")
        self.queue = queue
        self.depth = depth
        self.limit = limit
