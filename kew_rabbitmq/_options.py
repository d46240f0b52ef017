"""The RabbitMQ provider's URL: its schemes, kew's options and those of
pika's ``URLParameters`` that mean something here, read into
:class:`Options`.

``amqp://user:password@host:port,host2:port/vhost?option=value`` (``amqps://``
for TLS).  The URL path is the virtual host (``/`` when empty); several
hosts (a cluster's nodes) are tried in order, starting with the one that
took the process's last connection (:mod:`kew_rabbitmq._connection`).
Every option is checked when the URL is read (no network I/O), and one the
provider does not use stops start-up with a :class:`ConfigError` listing
those it accepts.  pika's options keep pika's names and meanings, except
where kew does the work itself (reconnecting: ``connection_attempts`` and
``retry_delay`` set kew's retries and their delay, pika never retries).
"""

from __future__ import annotations

import ast
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pika

from kew.qchan.spi import ConfigError, ProviderURL
from kew.qchan.spi.kit import Backoff
from kew.qchan.spi.urls import redact

SCHEMES = ("amqp", "amqps")

#: kew's own options.
KEW_OPTIONS = (
    "queue_type",
    "retries",
    "connection_name",
    "delay_granularity",
    "max_message_size",
    "batch",
    "ca_certs",
    "certfile",
    "keyfile",
)
#: Options of pika's ``URLParameters`` (pika 1.3 and 1.4) that kew takes.
PIKA_OPTIONS = (
    "heartbeat",
    "connection_attempts",
    "retry_delay",
    "socket_timeout",
    "stack_timeout",
    "blocked_connection_timeout",
    "channel_max",
    "frame_max",
    "locale",
    "client_properties",
    "ssl_options",
    "tcp_options",
)
ACCEPTED = KEW_OPTIONS + PIKA_OPTIONS

#: Names people bring from elsewhere, and what to use instead.
_REFUSED = {
    "heartbeat_interval": "pika 0.x's name: use heartbeat",
    "ssl": "pika 0.x's switch: use an amqps:// URL",
    "backpressure_detection": "gone since pika 1.0: see blocked_connection_timeout",
    "virtual_host": "the URL path is the virtual host",
    "vhost": "the URL path is the virtual host",
    "prefetch": "a consumer's prefetch is Queue.sink(prefetch=...)",
}

#: Keys of ``ssl_options`` (pika's spelling, aliases included).
_SSL_KEYS = {
    "ca_certs": "cafile",
    "cafile": "cafile",
    "ca_path": "capath",
    "capath": "capath",
    "ca_data": "cadata",
    "cadata": "cadata",
    "certfile": "certfile",
    "keyfile": "keyfile",
    "password": "password",
    "ciphers": "ciphers",
    "server_hostname": "server_hostname",
}
#: TCP options pika sets (others it ignores with a warning: kew refuses them).
_TCP_KEYS = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")

_SSL_OPTIONS = re.compile(r"([?&]ssl_options=)([^&#]*)")


def mask(url: str) -> str:
    """``url`` with its password as ``***``, and ``ssl_options`` too when
    it holds a key's password."""

    def hide(m: re.Match[str]) -> str:
        return m.group(1) + ("***" if "password" in unquote(m.group(2)).lower() else m.group(2))

    return _SSL_OPTIONS.sub(hide, redact(url))


@dataclass(frozen=True)
class Options:
    #: The URL, password masked.
    url: str
    #: One per host, in the URL's order (pika's ``connection_attempts`` is 1:
    #: kew retries, :mod:`kew_rabbitmq._connection`).
    params: list[pika.ConnectionParameters] = field(repr=False)
    username: str
    vhost: str
    queue_type: str
    #: Rounds over the hosts after the first before BrokerUnavailable.
    retries: int
    #: A fixed delay between rounds (pika's ``retry_delay``), else a back-off.
    retry_delay: float | None
    #: How long opening a connection may take: TCP, TLS and AMQP handshakes.
    stack_timeout: float
    delay_granularity: int
    max_message_size: int
    batch: str

    def backoff(self) -> Backoff:
        """The delays between connection rounds: 0.1 s doubling up to 2 s, or
        ``retry_delay``; with jitter either way."""
        if self.retry_delay is None:
            return Backoff()
        return Backoff(first=self.retry_delay, most=self.retry_delay)

    @classmethod
    def from_url(cls, url: str) -> Options:
        safe = mask(url)
        try:
            p = ProviderURL.parse(url, SCHEMES)
        except ConfigError as e:  # its words, with ssl_options' password masked too
            raise ConfigError(str(e).replace(redact(url), safe)) from None
        p.redacted = safe
        unknown = sorted(set(p.options) - set(ACCEPTED))
        if unknown:
            why = "".join(f"; {n}: {_REFUSED[n]}" for n in unknown if n in _REFUSED)
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} in {safe!r}{why}; "
                f"the RabbitMQ provider accepts: {', '.join(ACCEPTED)}"
            )
        options = cls._read(p, safe)
        p.finish()
        return options

    @classmethod
    def _read(cls, p: ProviderURL, safe: str) -> Options:
        if "retries" in p.options and "connection_attempts" in p.options:
            raise ConfigError(
                f"retries and connection_attempts say the same (attempts = retries + 1): "
                f"give one of them: {safe!r}"
            )
        if "connection_attempts" in p.options:
            retries = p.get_int("connection_attempts", 1, minimum=1) - 1
        else:
            retries = p.get_int("retries", 10)
        retry_delay = p.get_float("retry_delay", 0.0) if "retry_delay" in p.options else None
        socket_timeout = p.get_float("socket_timeout", 10.0, minimum=0.001)
        stack_timeout = p.get_float("stack_timeout", 15.0, minimum=0.001)
        blocked = p.get_float("blocked_connection_timeout", 60.0)
        name = p.get_str("connection_name", "kew") or "kew"
        properties = {**_literal_dict(p, "client_properties", _table), "connection_name": name}
        common: dict[str, Any] = {
            "virtual_host": p.path or "/",
            "credentials": pika.PlainCredentials(p.username or "guest", p.password or "guest"),
            "heartbeat": p.get_int("heartbeat", 30),
            "ssl_options": _tls(p, safe),
            "blocked_connection_timeout": blocked or None,  # 0: no limit
            "connection_attempts": 1,
            "socket_timeout": socket_timeout,
            "stack_timeout": stack_timeout,
            "client_properties": properties,
            "channel_max": p.get_int("channel_max", pika.channel.MAX_CHANNELS, minimum=1),
            "frame_max": p.get_int("frame_max", pika.spec.FRAME_MAX_SIZE, minimum=1),
            "locale": p.get_str("locale", "en_US") or "en_US",
            "tcp_options": _literal_dict(p, "tcp_options", _tcp) or None,
        }
        default_port = 5671 if p.scheme == "amqps" else 5672
        try:
            params = [
                pika.ConnectionParameters(
                    host=host or "127.0.0.1", port=port or default_port, **common
                )
                for host, port in (p.hosts or [("127.0.0.1", None)])
            ]
        except (TypeError, ValueError) as e:  # pika's range checks (channel_max, frame_max)
            raise ConfigError(f"{e} in {safe!r}") from None
        return cls(
            url=safe,
            params=params,
            username=p.username or "guest",
            vhost=p.path or "/",
            queue_type=p.get_choice("queue_type", "classic", ("classic", "quorum")),
            retries=retries,
            retry_delay=retry_delay,
            stack_timeout=stack_timeout,
            delay_granularity=p.get_int("delay_granularity", 100, minimum=1),
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
            batch=p.get_choice("batch", "pipeline", ("pipeline", "tx")),
        )


def _literal_dict(p: ProviderURL, name: str, check: Any) -> dict[str, Any]:
    """A Python dict literal (pika's format for these options), checked."""
    text = p.get_str(name)
    if text is None:
        return {}
    shown = "***" if "password" in text.lower() else repr(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"option {name}={shown} in {p.redacted!r}: expected a dict literal with text keys, "
            "e.g. {'key': 'value'} (URL-encoded)"
        )
    problem = check(value)
    if problem:
        raise ConfigError(f"option {name}={shown} in {p.redacted!r}: {problem}")
    return value


def _table(value: dict[str, Any]) -> str:
    """What pika cannot write in an AMQP table (client_properties)."""
    for key, item in value.items():
        if isinstance(item, dict):
            nested = _table(item)
            if nested:
                return nested
        elif not isinstance(item, str | int):  # bool is an int
            return f"{key!r} holds {type(item).__name__}; values are text, integers or dicts"
    return ""


def _tcp(value: dict[str, Any]) -> str:
    for key, item in value.items():
        if key not in _TCP_KEYS:
            return f"{key!r} is not one of {', '.join(_TCP_KEYS)}"
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            return f"{key!r} must be an integer >= 0"
    return ""


def _ssl_check(value: dict[str, Any]) -> str:
    for key, item in value.items():
        if key == "protocol":
            return "'protocol' is not taken: kew uses the TLS client defaults of Python's ssl"
        if key not in _SSL_KEYS:
            return f"{key!r} is not one of {', '.join(_SSL_KEYS)}"
        if not isinstance(item, str):
            return f"{key!r} must be text"
    return ""


def _tls(p: ProviderURL, safe: str) -> pika.SSLOptions | None:
    """The TLS context of an ``amqps://`` URL: the server's certificate is
    verified and its host name checked; the files from ``ca_certs``,
    ``certfile``, ``keyfile`` or pika's ``ssl_options``."""
    files = {_SSL_KEYS[k]: v for k in ("ca_certs", "certfile", "keyfile") if (v := p.get_str(k))}
    given = dict(_literal_dict(p, "ssl_options", _ssl_check))
    if (files or given) and p.scheme != "amqps":
        raise ConfigError(f"TLS options need an amqps:// URL: {safe!r}")
    if p.scheme != "amqps":
        return None
    for key, value in given.items():
        name = _SSL_KEYS[key]
        if name in files:
            raise ConfigError(f"{name} is given twice (as an option and in ssl_options): {safe!r}")
        files[name] = value
    try:
        context = ssl.create_default_context(
            cafile=files.get("cafile"), capath=files.get("capath"), cadata=files.get("cadata")
        )
        if "certfile" in files:
            context.load_cert_chain(files["certfile"], files.get("keyfile"), files.get("password"))
        elif "keyfile" in files:
            raise ConfigError(f"keyfile without certfile: {safe!r}")
        if "ciphers" in files:
            context.set_ciphers(files["ciphers"])
    except (OSError, ssl.SSLError) as e:  # a file missing or unreadable, a wrong password
        raise ConfigError(f"TLS files of {safe!r}: {e}") from None
    return pika.SSLOptions(context, server_hostname=files.get("server_hostname"))
