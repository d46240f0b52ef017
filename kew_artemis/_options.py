"""The STOMP provider's URL: its schemes, kew's options and the stomp.py
connection options that mean something here, read into :class:`Options`.

``stomp://[login:passcode@]host[:port][,host2[:port]...]/?option=value``
and ``stomp+ssl://`` (TLS).  Every option is checked when the URL is read
(no network I/O); an option the provider does not use stops start-up with
a :class:`ConfigError` listing those it accepts (and, for stomp.py options
kew does not pass on, why).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from kew.qchan.spi import ConfigError, ProviderURL

SCHEMES = ("stomp", "stomp+ssl")
DIALECTS = ("artemis", "activemq", "rabbitmq")

#: kew's own options.
KEW_OPTIONS = (
    "dialect",
    "heartbeat",
    "retries",
    "connect_timeout",
    "receipt_timeout",
    "batch",
    "window_bytes",
    "delay_granularity",
    "browse_idle",
    "max_message_size",
)
#: stomp.py's connection options (``stomp.Connection12``) that kew passes on.
STOMP_OPTIONS = ("vhost", "heartbeats", "heart_beat_receive_scale", "keepalive", "bind_host_port")
#: TLS options (``Connection12.set_ssl``), ``stomp+ssl://`` only; ``cert_file``
#: and ``key_file`` are stomp.py's spellings of ``certfile`` and ``keyfile``.
TLS_OPTIONS = ("ca_certs", "certfile", "keyfile", "cert_file", "key_file", "ssl_password", "verify")
ACCEPTED = KEW_OPTIONS + STOMP_OPTIONS + TLS_OPTIONS

_OWN_RECONNECT = "kew reconnects itself (option retries; stomp.py's reconnect races)"
_USER_INFO = "give the login and passcode in the URL: stomp://login:passcode@host"
_HOST_ORDER = "kew tries the URL's hosts in the order written, from the last one that answered"
#: stomp.py options that kew refuses, and why (said in the error).
_REFUSED = {
    "timeout": "it is kew's connect_timeout",
    "reconnect_attempts_max": _OWN_RECONNECT,
    "reconnect_sleep_initial": _OWN_RECONNECT,
    "reconnect_sleep_increase": _OWN_RECONNECT,
    "reconnect_sleep_jitter": _OWN_RECONNECT,
    "reconnect_sleep_max": _OWN_RECONNECT,
    "prefer_localhost": _HOST_ORDER,
    "try_loopback_connect": _HOST_ORDER,
    "host_and_ports": "list the hosts in the URL: stomp://h1:61613,h2:61613/",
    "auto_decode": "kew reads bodies as bytes (the queue's codec decodes them)",
    "encoding": "kew reads bodies as bytes (the queue's codec decodes them)",
    "auto_content_length": "kew always sends content-length (a body may hold NUL bytes)",
    "ssl_version": "kew negotiates the newest TLS version both sides speak",
    "cert_validator": "a function cannot be given in a URL",
    "login": _USER_INFO,
    "passcode": _USER_INFO,
    "username": _USER_INFO,
    "password": _USER_INFO,
}

# (ssl_password, like passcode and password, is masked by ProviderURL's redaction.)
#: ``host:port`` or ``[v6]:port``.
_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<host>[^:\[\]]*):(?P<port>\d+)")


@dataclass(frozen=True)
class Options:
    """The options of a ``stomp://`` URL (docs/providers/artemis.md has the table).

    ``dialect`` (artemis|activemq|rabbitmq), ``heartbeat`` (ms both ways,
    default 10000, 0 off) or stomp.py's ``heartbeats`` (``send,receive`` ms),
    ``heart_beat_receive_scale`` (default 2: a connection is lost after that
    many receive intervals of silence), ``retries`` (connection rounds
    before BrokerUnavailable, default 10), ``receipt_timeout`` (s, default
    30), ``connect_timeout`` (s, default 10: TCP connect, TLS handshake,
    CONNECTED), ``keepalive`` (TCP keepalive, default on),
    ``bind_host_port`` (the local address to connect from, ``host:0``),
    ``window_bytes`` (Artemis: consumer-window-size per prefetched message,
    default 1, so at most ``prefetch`` messages are in flight; raise it to about
    the message size for throughput), ``batch`` (how ``send_many`` stores a
    batch: ``pipeline`` = every SEND receipted, all receipts awaited together;
    ``tx`` = the SENDs inside a STOMP transaction whose one receipted COMMIT
    stores the whole batch (a SEND in a transaction is only stored at COMMIT,
    so its own receipt would promise nothing); ``auto``, the default, is ``tx``
    on ActiveMQ, which stores plain receipted SENDs one at a time, and
    ``pipeline`` elsewhere), ``delay_granularity`` (ms, default 100: RabbitMQ's
    delay queues round a delay up to this), ``browse_idle`` (s, default 0.3: how
    long a drain waits for one more message where the broker cannot say the
    queue is empty), ``max_message_size`` (bytes, default 64 MiB), ``vhost``
    (the CONNECT host header; default the host name, ``/`` on RabbitMQ),
    ``ca_certs``, ``certfile`` (or ``cert_file``), ``keyfile`` (or
    ``key_file``), ``ssl_password`` (the key file's), ``verify`` (default
    true; false accepts any server certificate) for stomp+ssl.  Login and
    passcode come from the URL's user info.
    """

    hosts: list[tuple[str, int]]
    tls: bool
    ca_certs: str | None
    certfile: str | None
    keyfile: str | None
    login: str | None
    passcode: str | None = field(repr=False)
    vhost: str | None
    dialect: str
    heartbeats: tuple[int, int]
    retries: int
    receipt_timeout: float
    connect_timeout: float
    window_bytes: int
    batch: str
    delay_granularity: int
    browse_idle: float
    max_message_size: int
    heart_beat_receive_scale: float = 2.0
    keepalive: bool = True
    bind_host_port: tuple[str, int] | None = None
    ssl_password: str | None = field(default=None, repr=False)
    verify: bool = True

    @property
    def heartbeat(self) -> int:
        """The heartbeat kew sends (ms); ``heartbeats`` has both ways."""
        return self.heartbeats[0]

    def host_header(self, host: str) -> str:
        """The CONNECT frame's ``host`` header for ``host``."""
        return self.vhost or ("/" if self.dialect == "rabbitmq" else host)

    @classmethod
    def from_url(cls, url: str) -> Options:
        p = ProviderURL.parse(url, SCHEMES)
        unknown = sorted(set(p.options) - set(ACCEPTED))
        if unknown:
            why = "".join(f"; {n}: {_REFUSED[n]}" for n in unknown if n in _REFUSED)
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} in {p.redacted!r}{why}; "
                f"the STOMP provider accepts: {', '.join(ACCEPTED)}"
            )
        tls = p.scheme == "stomp+ssl"
        given_tls = [n for n in TLS_OPTIONS if n in p.options]
        if given_tls and not tls:
            raise ConfigError(
                f"TLS options ({', '.join(given_tls)}) need a stomp+ssl:// URL: {p.redacted!r}"
            )
        certfile = _either(p, "certfile", "cert_file")
        keyfile = _either(p, "keyfile", "key_file")
        if keyfile and not certfile:
            raise ConfigError(f"keyfile without certfile in {p.redacted!r}")
        options = cls(
            hosts=[(h or "127.0.0.1", port or 61613) for h, port in p.hosts]
            or [("127.0.0.1", 61613)],
            tls=tls,
            ca_certs=p.get_str("ca_certs"),
            certfile=certfile,
            keyfile=keyfile,
            login=p.username,
            passcode=p.password,
            vhost=p.get_str("vhost"),
            dialect=p.get_choice("dialect", "artemis", DIALECTS),
            heartbeats=_heartbeats(p),
            retries=p.get_int("retries", 10),
            receipt_timeout=p.get_float("receipt_timeout", 30.0, minimum=0.1),
            connect_timeout=p.get_float("connect_timeout", 10.0, minimum=0.1),
            window_bytes=p.get_int("window_bytes", 1, minimum=1),
            batch=p.get_choice("batch", "auto", ("auto", "pipeline", "tx")),
            delay_granularity=p.get_int("delay_granularity", 100, minimum=1),
            browse_idle=p.get_float("browse_idle", 0.3, minimum=0.01),
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
            heart_beat_receive_scale=p.get_float("heart_beat_receive_scale", 2.0, minimum=1.0),
            keepalive=p.get_bool("keepalive", True),
            bind_host_port=_bind(p),
            ssl_password=p.get_str("ssl_password"),
            verify=p.get_bool("verify", True),
        )
        p.finish()
        if options.batch == "auto":  # ActiveMQ syncs its journal per plain SEND
            batch = "tx" if options.dialect == "activemq" else "pipeline"
            options = dataclasses.replace(options, batch=batch)
        return options


def _either(p: ProviderURL, name: str, stomp_name: str) -> str | None:
    """An option kew and stomp.py spell differently; not both."""
    mine, theirs = p.get_str(name), p.get_str(stomp_name)
    if mine is not None and theirs is not None:
        raise ConfigError(f"{name} and {stomp_name} are one option; give one: {p.redacted!r}")
    return mine if mine is not None else theirs


def _heartbeats(p: ProviderURL) -> tuple[int, int]:
    """``heartbeat`` (both ways) or stomp.py's ``heartbeats=send,receive``."""
    raw = p.get_str("heartbeats")
    if raw is None:
        beat = p.get_int("heartbeat", 10_000)
        return beat, beat
    if "heartbeat" in p.options:
        raise ConfigError(f"heartbeat and heartbeats: give one of the two: {p.redacted!r}")
    parts = raw.split(",")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise ConfigError(
            f"option heartbeats={raw!r} in {p.redacted!r}: expected send,receive in ms "
            "(e.g. 10000,10000; 0 turns one way off)"
        )
    return int(parts[0]), int(parts[1])


def _bind(p: ProviderURL) -> tuple[str, int] | None:
    """stomp.py's ``bind_host_port``: the local address to connect from.
    The port must be 0 (any): kew opens several connections (the
    connector's, each producer's and consumer's), which cannot share one."""
    raw = p.get_str("bind_host_port")
    if raw is None:
        return None
    m = _HOST_PORT.fullmatch(raw)
    if m is None or int(m["p6"] or m["port"]) != 0:
        raise ConfigError(
            f"option bind_host_port={raw!r} in {p.redacted!r}: expected host:0, e.g. "
            "10.0.0.5:0 (the port must be 0: kew opens several connections, which "
            "cannot share one local port)"
        )
    return m["v6"] or m["host"], 0
