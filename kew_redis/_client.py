"""The provider's redis-py client: made again after ``os.fork``, and every
call retried and translated into kew's errors.

* :class:`Client` holds one redis-py client (and its connection pool) per
  process: in a child made by ``os.fork`` (or ``multiprocessing`` with the
  fork start method) the first call makes a new one, so a child never
  writes on its parent's sockets.  The parent's client is left alone.
* :meth:`Client.call` runs an operation, retries it on a lost or refused
  connection (``retries`` times, with :class:`kew.qchan.spi.kit.Backoff`
  delays), and raises kew's errors only, with redis-py's as the cause:

  ======================================  ==================================
  what Redis (or the network) said        raised, at once unless noted
  ======================================  ==================================
  wrong password, unknown user, NOPERM    :class:`AccessRefused`
  ``DB index is out of range``            :class:`ConfigError` naming the db
  a reply that is not RESP (HTTP, SMTP)   :class:`BrokerUnavailable`
  refused, reset, timed out, LOADING      :class:`BrokerUnavailable` after
                                          the retries
  ``WRONGTYPE``                           :class:`ConfigError`
  any other error reply (OOM, READONLY)   ``refused`` (:class:`SendError`
                                          for sends, else
                                          :class:`BrokerUnavailable`)
  Cluster: CLUSTERDOWN, TRYAGAIN, MOVED,  :class:`BrokerUnavailable` after
  ASK, slots not covered, no seed node    the retries (a failover, a
  reachable                               resharding)
  Cluster: a seed node is not a Cluster   :class:`ConfigError`
  node; MOVED without ``cluster=yes``
  ======================================  ==================================
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    InvalidResponse,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from kew.qchan.spi import AccessRefused, BrokerUnavailable, ConfigError, KewError
from kew.qchan.spi.kit import Backoff
from kew_redis._options import Options

R = TypeVar("R")

#: The errors after which the same call may work: the connection was
#: refused, lost or timed out, or the server is still loading its data.
_PASSING = (redis.ConnectionError, redis.TimeoutError)
#: On a Cluster, also: a failover or a resharding under way (MOVED is an AskError).
_CLUSTER_PASSING = (ClusterDownError, TryAgainError, AskError)


def script(text: str) -> Any:
    """A Lua script for ``script(keys=..., args=..., client=r)``: EVALSHA,
    loaded at its first NOSCRIPT.  It belongs to no client (making one
    here would make a RedisCluster, which reads the cluster's layout)."""
    from redis.commands.core import Script

    return Script(cast(Any, None), text.encode())


def aio_script(text: str) -> Any:
    """:func:`script` for redis.asyncio: ``await s(keys=..., args=..., client=r)``."""
    from redis.commands.core import AsyncScript

    return AsyncScript(cast(Any, None), text.encode())


# The reply, or redis-py's words for a pipeline's command that got it.
_WRONGTYPE = re.compile(r"^WRONGTYPE|of pipeline caused error: WRONGTYPE")


class NotReplicated(redis.RedisError):
    """A write the master stored and fewer than ``min_replicas`` replicas
    confirmed (WAIT) in time: it may be lost if that master fails."""

    @classmethod
    def of(cls, where: str, acked: int, wanted: int, timeout_ms: int) -> NotReplicated:
        """What ``WAIT wanted timeout_ms`` on the master ``where`` answering
        ``acked`` means (the same words on the sync and async routes)."""
        return cls(
            f"the write is on the master {where}, but {acked} of min_replicas={wanted} "
            f"replica(s) confirmed it within {timeout_ms / 1000:g} s: it may be lost if "
            "that master fails before a replica has it"
        )


class Client:
    """One redis-py client per process, for a connector or a consumer."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.url = options.url
        self._pid = os.getpid()
        self._redis: Any = None  # made at the first call (a RedisCluster does I/O then)
        self._making = threading.Lock()

    def get(self) -> Any:
        """The redis-py client of this process (made at the first call, and
        again after a fork)."""
        if self._pid != os.getpid():
            # The parent's client and pool are dropped unused: closing them
            # here would touch sockets the parent still owns.
            self._redis = None
            self._pid = os.getpid()
        if self._redis is None:
            with self._making:
                if self._redis is None:
                    self._redis = self.options.client()
        return self._redis

    def call(
        self,
        fn: Callable[[Any], R],
        *,
        refused: type[KewError] = BrokerUnavailable,
        stop: threading.Event | None = None,
    ) -> R:
        """``fn(client)``, retried on a passing fault; kew's errors only.
        ``fn`` must do the whole operation (a pipeline is built inside it),
        since a retry runs it again; ``stop`` ends the waits between tries."""
        backoff = Backoff()
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return fn(self.get())
            except (redis.RedisError, RedisClusterException) as e:
                final = self.translate(e, refused)
                if final is None and attempts <= self.options.retries:
                    if backoff.wait(stop):
                        final = BrokerUnavailable(
                            f"Redis at {self.url}: closed while retrying: {e}"
                        )
                    else:
                        continue
                if final is None:
                    final = BrokerUnavailable(
                        f"Redis at {self.url} is unreachable after {attempts} attempt(s) "
                        f"in {time.monotonic() - started:.1f} s: {e}"
                    )
                raise final from e

    def translate(
        self,
        e: redis.RedisError | RedisClusterException,
        refused: type[KewError] = BrokerUnavailable,
    ) -> KewError | None:
        """kew's error for ``e``, or None for a passing fault (retry)."""
        url = self.url
        if isinstance(e, RedisClusterException):
            return self._cluster_error(e, refused)
        if isinstance(e, NotReplicated):
            return refused(f"Redis at {url}: {e}")
        if isinstance(e, AuthenticationError | AuthorizationError):
            who = self.options.username or "default"
            return AccessRefused(f"Redis at {url} refused the credentials of user {who!r}: {e}")
        if isinstance(e, NoPermissionError):
            who = self.options.username or "default"
            return AccessRefused(f"Redis at {url} refused user {who!r} the permission: {e}")
        if isinstance(e, InvalidResponse):
            return BrokerUnavailable(
                f"{url}: the server there does not speak the Redis protocol (RESP): {e}"
            )
        if isinstance(e, _PASSING):
            return None
        if isinstance(e, _CLUSTER_PASSING):
            if self.options.cluster:
                return None
            return ConfigError(
                f"Redis at {url} is a Redis Cluster node ({e}): name several nodes, or add "
                "cluster=yes to the URL"
            )
        if isinstance(e, ResponseError) and "DB index" in str(e):
            return ConfigError(
                f"Redis at {url} has no database {self.options.db} ({e}); the server's "
                "'databases' setting bounds the numbers"
            )
        if isinstance(e, ResponseError) and _WRONGTYPE.search(str(e)):
            return ConfigError(
                f"Redis at {url}: a key of kew's holds another type of value (another "
                f"program's key under the prefix {self.options.prefix!r}?): {e}"
            )
        return refused(f"Redis at {url} answered with an error: {e}")

    def _cluster_error(self, e: RedisClusterException, refused: type[KewError]) -> KewError | None:
        """RedisCluster's own errors: making it (no seed node reachable, or
        one that is not a Cluster node) and routing (slots not covered)."""
        if isinstance(e, SlotNotCoveredError):
            return None  # a failover under way: the layout is read again
        cause = e.__cause__
        if isinstance(cause, RedisClusterException):  # CLUSTER SLOTS refused
            cause = cause.__context__ or cause
        if isinstance(cause, AuthenticationError | AuthorizationError | NoPermissionError):
            return self.translate(cause, refused)  # e.g. every seed node refused the password
        if isinstance(cause, ResponseError):
            return ConfigError(
                f"Redis at {self.url}: a seed node is not a Redis Cluster node (CLUSTER "
                f"SLOTS: {cause}); for one server, name one host without cluster=yes"
            )
        if "cannot be connected" in str(e) or "not covered" in str(e):
            return None  # down, or a failover under way: try again
        return refused(f"Redis Cluster at {self.url}: {e}")

    def close(self) -> None:
        if self._pid == os.getpid() and self._redis is not None:
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                self._redis.close()
