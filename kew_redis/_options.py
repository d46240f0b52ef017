"""The Redis provider's URL: its schemes, kew's options and the redis-py
options that mean something here, read into :class:`Options`.

``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) and
``unix://[user:password@]/path/to/redis.sock[?db=N]`` (redis-py's spelling
of a Unix socket).  Redis Cluster: several ``host:port`` separated by commas
(seed nodes, ``redis://h1:7000,h2:7001/``), or one with ``?cluster=yes``;
kew then uses redis-py's ``RedisCluster``.  Every option is checked when the
URL is read (no network I/O), and an option the provider does not use stops
start-up with a :class:`ConfigError` listing those it accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kew.qchan.spi import ConfigError, ProviderURL
from kew.qchan.spi.urls import redact

SCHEMES = ("redis", "rediss", "unix")

#: kew's own options.
KEW_OPTIONS = (
    "prefix",
    "lease",
    "retries",
    "max_message_size",
    "cluster",
    "min_replicas",
    "replica_timeout",
)
#: redis-py's connection options (``Redis.from_url``) that kew passes on.
CLIENT_OPTIONS = (
    "db",
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "health_check_interval",
    "client_name",
)
#: redis-py's TLS options, ``rediss://`` only.
TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_ciphers",
)
ACCEPTED = KEW_OPTIONS + CLIENT_OPTIONS + TLS_OPTIONS

#: redis-py options that kew refuses, and why (said in the error).
_REFUSED = {
    "protocol": "kew reads RESP2 replies",
    "legacy_responses": "kew reads RESP2 replies",
    "retry_on_timeout": "kew retries itself (option retries)",
    "retry_on_error": "kew retries itself (option retries)",
    "max_connections": "a full pool would fail operations instead of waiting",
    "timeout": "it sizes a blocking pool, which kew does not use",
}

# Secrets the shared redaction does not know: a TLS key's password.
_SECRET = re.compile(r"(?i)([?&]ssl_password=)[^&#]*")
_CLIENT_NAME = re.compile(r"[\x21-\x7e]+")  # Redis refuses spaces and control characters


def mask(url: str) -> str:
    """``url`` with every password (user, query, TLS key) as ``***``."""
    return _SECRET.sub(r"\1***", redact(url))


@dataclass(frozen=True)
class Options:
    url: str  # masked
    host: str
    port: int
    path: str | None  # a Unix socket
    db: int
    username: str | None = field(repr=False)
    password: str | None = field(repr=False)
    tls: bool
    prefix: str
    lease_ms: int
    retries: int
    socket_timeout: float
    max_message_size: int
    #: Redis Cluster: the seed nodes (host, port) of ``RedisCluster``.
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    #: Sends and settles wait (WAIT) until this many replicas have the write.
    min_replicas: int
    replica_timeout_ms: int
    #: Other keyword arguments of ``redis.Redis`` (timeouts, keepalive, TLS).
    extra: dict[str, Any] = field(repr=False)

    @classmethod
    def from_url(cls, url: str) -> Options:
        try:
            return cls._read(ProviderURL.parse(url, SCHEMES), mask(url))
        except ConfigError as e:  # ProviderURL's words, with the TLS key's password masked too
            raise ConfigError(_SECRET.sub(r"\1***", str(e))) from None

    @classmethod
    def _read(cls, p: ProviderURL, safe: str) -> Options:
        unknown = sorted(set(p.options) - set(ACCEPTED))
        if unknown:
            why = "".join(f"; {n}: {_REFUSED[n]}" for n in unknown if n in _REFUSED)
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} in {safe!r}{why}; "
                f"the Redis provider accepts: {', '.join(ACCEPTED)}"
            )
        tls = p.scheme == "rediss"
        given_tls = [n for n in TLS_OPTIONS if n in p.options]
        if given_tls and not tls:
            raise ConfigError(
                f"TLS options ({', '.join(given_tls)}) need a rediss:// URL: {safe!r}"
            )
        host, port, path, db = _where(p, safe)
        cluster = p.get_bool("cluster", len(p.hosts) > 1)
        nodes = _cluster(p, safe, cluster, db)
        if cluster and "health_check_interval" in p.options:
            raise ConfigError(
                f"health_check_interval is not taken by redis-py's RedisCluster: {safe!r}"
            )
        socket_timeout = p.get_float("socket_timeout", 10.0, minimum=0.1)
        extra: dict[str, Any] = {
            "socket_connect_timeout": p.get_float(
                "socket_connect_timeout", socket_timeout, minimum=0.1
            ),
            "health_check_interval": p.get_int("health_check_interval", 0),
        }
        if "socket_keepalive" in p.options:
            extra["socket_keepalive"] = p.get_bool("socket_keepalive", True)
        client_name = p.get_str("client_name")
        if client_name is not None:
            if not _CLIENT_NAME.fullmatch(client_name):
                raise ConfigError(
                    f"option client_name={client_name!r} in {safe!r}: expected printable "
                    "characters without spaces (Redis refuses others)"
                )
            extra["client_name"] = client_name
        if tls:
            extra.update(_tls(p))
        options = cls(
            url=safe,
            host=host,
            port=port,
            path=path,
            db=db,
            username=_one(p.username, p.get_str("username"), "username", safe),
            password=_one(p.password, p.get_str("password"), "password", safe),
            tls=tls,
            prefix=p.get_str("prefix", "kew") or "kew",
            lease_ms=round(p.get_float("lease", 30.0, minimum=0.1) * 1000),
            retries=p.get_int("retries", 20 if cluster else 10),
            socket_timeout=socket_timeout,
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
            cluster=cluster,
            nodes=nodes,
            min_replicas=p.get_int("min_replicas", 0),
            replica_timeout_ms=round(p.get_float("replica_timeout", 2.0, minimum=0.001) * 1000),
            extra=extra,
        )
        p.finish()
        return options

    def client(self) -> Any:
        """A new redis-py client.  It never retries by itself (kew does,
        :mod:`kew_redis._client`) and connects at its first command, but a
        ``RedisCluster`` asks its seed nodes for the cluster's layout when
        made: make it when it is first needed.  redis-py annotates results
        for its sync and async clients at once (unions with Awaitable):
        results are read as Any and checked."""
        import redis
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        return self._make(redis.Redis, RedisCluster, ClusterNode, Retry)

    def aio_client(self) -> Any:
        """A new redis.asyncio client (its ``RedisCluster`` on Cluster) with
        the same settings as :meth:`client`, for the native async route; it
        belongs to the event loop that first uses it.  The async cluster
        client takes neither ``ssl_password`` nor ``ssl_ca_path``."""
        from redis.asyncio import Redis
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry

        if self.cluster:
            missing = sorted({"ssl_password", "ssl_ca_path"} & set(self.extra))
            if missing:
                raise ConfigError(
                    f"redis.asyncio's RedisCluster (kew.aio on Redis Cluster) does not take "
                    f"{', '.join(missing)}: {self.url!r}"
                )
        return self._make(Redis, RedisCluster, ClusterNode, Retry)

    def _make(self, redis_class: Any, cluster_class: Any, node: Any, retry: Any) -> Any:
        from redis.backoff import NoBackoff

        if self.cluster:
            extra = {k: v for k, v in self.extra.items() if k != "health_check_interval"}
            return cluster_class(
                startup_nodes=[node(h, p) for h, p in self.nodes],
                username=self.username,
                password=self.password,
                ssl=self.tls,
                socket_timeout=self.socket_timeout,
                retry=retry(NoBackoff(), 0),
                **extra,
            )
        where: dict[str, Any] = (
            {"unix_socket_path": self.path}
            if self.path is not None
            else {"host": self.host, "port": self.port}
        )
        return redis_class(
            **where,
            db=self.db,
            username=self.username,
            password=self.password,
            ssl=self.tls,
            socket_timeout=self.socket_timeout,
            retry=retry(NoBackoff(), 0),
            **self.extra,
        )


def _where(p: ProviderURL, safe: str) -> tuple[str, int, str | None, int]:
    """Host, port, Unix socket path and database of the URL."""
    db_option = p.get_int("db", -1) if "db" in p.options else None
    if p.scheme == "unix":
        if p.hosts or not p.path:
            raise ConfigError(
                f"a unix:// URL names a socket file and no host, e.g. "
                f"unix:///run/redis/redis.sock?db=0: {safe!r}"
            )
        return "", 0, "/" + p.path, db_option or 0
    host, port = p.hosts[0] if p.hosts else ("127.0.0.1", None)
    try:
        db = int(p.path.strip("/") or 0)
    except ValueError:
        raise ConfigError(f"the URL path must be a database number: {safe!r}") from None
    if db_option is not None:
        if p.path.strip("/") and db_option != db:
            raise ConfigError(f"two database numbers, {db} and db={db_option}: {safe!r}")
        db = db_option
    if db < 0:
        raise ConfigError(f"the database number must be 0 or more: {safe!r}")
    return host or "127.0.0.1", port or 6379, None, db


def _cluster(p: ProviderURL, safe: str, cluster: bool, db: int) -> tuple[tuple[str, int], ...]:
    """The seed nodes of a Redis Cluster URL (none for one server)."""
    if not cluster:
        if len(p.hosts) > 1:
            raise ConfigError(
                f"several hosts name the seed nodes of a Redis Cluster, but the URL says "
                f"cluster=no (kew does not fail over between servers itself): {safe!r}"
            )
        return ()
    if p.scheme == "unix":
        raise ConfigError(f"Redis Cluster is reached over TCP, not a unix:// socket: {safe!r}")
    if db != 0:
        raise ConfigError(f"Redis Cluster has database 0 only, not {db}: {safe!r}")
    return tuple((h or "127.0.0.1", port or 6379) for h, port in p.hosts or [("", None)])


def _one(in_url: str | None, option: str | None, name: str, safe: str) -> str | None:
    if in_url is not None and option is not None:
        raise ConfigError(f"the {name} is given twice (before @ and as an option): {safe!r}")
    return in_url if in_url is not None else option


def _tls(p: ProviderURL) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: value
        for name in ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_ciphers")
        if (value := p.get_str(name)) is not None
    }
    password = p.get_str("ssl_password")
    if password is not None:
        out["ssl_password"] = password
    if "ssl_cert_reqs" in p.options:
        out["ssl_cert_reqs"] = p.get_choice(
            "ssl_cert_reqs", "required", ("none", "optional", "required")
        )
    if "ssl_check_hostname" in p.options:
        out["ssl_check_hostname"] = p.get_bool("ssl_check_hostname", True)
    return out
