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
  ======================================  ==================================
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    InvalidResponse,
    NoPermissionError,
    ResponseError,
)

from kew.qchan.spi import AccessRefused, BrokerUnavailable, ConfigError, KewError
from kew.qchan.spi.kit import Backoff
from kew_redis._options import Options

R = TypeVar("R")

#: The errors after which the same call may work: the connection was
#: refused, lost or timed out, or the server is still loading its data.
_PASSING = (redis.ConnectionError, redis.TimeoutError)


class Client:
    """One redis-py client per process, for a connector or a consumer."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.url = options.url
        self._pid = os.getpid()
        self._redis = options.client()

    def get(self) -> Any:
        """The redis-py client of this process (made again after a fork)."""
        if self._pid != os.getpid():
            # The parent's client and pool are dropped unused: closing them
            # here would touch sockets the parent still owns.
            self._redis = self.options.client()
            self._pid = os.getpid()
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
            except redis.RedisError as e:
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
        self, e: redis.RedisError, refused: type[KewError] = BrokerUnavailable
    ) -> KewError | None:
        """kew's error for ``e``, or None for a passing fault (retry)."""
        url = self.url
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
        if isinstance(e, ResponseError) and "DB index" in str(e):
            return ConfigError(
                f"Redis at {url} has no database {self.options.db} ({e}); the server's "
                "'databases' setting bounds the numbers"
            )
        if isinstance(e, ResponseError) and str(e).startswith("WRONGTYPE"):
            return ConfigError(
                f"Redis at {url}: a key of kew's holds another type of value (another "
                f"program's key under the prefix {self.options.prefix!r}?): {e}"
            )
        return refused(f"Redis at {url} answered with an error: {e}")

    def close(self) -> None:
        if self._pid == os.getpid():
            with contextlib.suppress(redis.RedisError):
                self._redis.close()
