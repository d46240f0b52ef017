"""Records for ``kew.idempotency`` on Redis (``RedisConnector.dedupe_store``).

One key per record, ``<prefix>:once:{<namespace>}:<key>``: ``d`` (done; PX
retention, or no expiry) or ``c:<token>`` (claimed; PX lease), changed by
Lua scripts (atomic) and removed by expiry.  With ``min_replicas``, the
done mark (``complete``, ``atomic_once`` with its effect) is confirmed by
that many replicas (WAIT, :mod:`kew_redis._writes`) before it counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from kew.qchan.spi.dedupe import ClaimResult
from kew_redis._client import Client, script
from kew_redis._writes import Recorder, pinned

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v == 'd' then return 'done' end
if v and v ~= ARGV[1] then return 'held' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'claimed'
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if ARGV[1] == '' then redis.call('SET', KEYS[1], 'd')
else redis.call('SET', KEYS[1], 'd', 'PX', ARGV[1]) end
if (not v) or v == ARGV[2] then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisDedupeStore:
    """Records as keys ``<prefix>:once:{<namespace>}:<key>``, changed by Lua
    scripts (atomic), removed by expiry.  ``atomic_once`` gives its effect a
    redis-py pipeline in MULTI: the commands the effect queues on it run in
    one MULTI/EXEC with the done mark (WATCHed, so a concurrent or retried
    run sees the mark and does not repeat the effect).  The hash tag puts a
    namespace in one Cluster slot; tag the effect's keys alike."""

    def __init__(self, client: Client, prefix: str, namespace: str) -> None:
        self.namespace = namespace
        self._client = client
        self._base = f"{prefix}:once:{{{namespace}}}:"
        self._claim, self._extend, self._complete, self._release = (
            script(s) for s in (_CLAIM, _EXTEND, _COMPLETE, _RELEASE)
        )

    def __repr__(self) -> str:
        return f"RedisDedupeStore({self.namespace!r}, {self._client.url!r})"

    def key(self, key: str) -> str:
        return self._base + key

    def _run(self, script: Any, key: str, *args: object) -> Any:
        k = self.key(key)
        return self._client.call(lambda r: script(keys=[k], args=list(args), client=r))

    def claim(self, key: str, token: str, lease_ms: int) -> ClaimResult:
        got = self._run(self._claim, key, "c:" + token, lease_ms)
        return ClaimResult(got.decode() if isinstance(got, bytes) else str(got))

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        return bool(self._run(self._extend, key, "c:" + token, lease_ms))

    def complete(self, key: str, token: str, retain_ms: int | None) -> bool:
        retain = "" if retain_ms is None else str(retain_ms)
        options = self._client.options
        if not options.min_replicas:
            return bool(self._run(self._complete, key, retain, "c:" + token))
        k = self.key(key)

        def run(r: Any) -> bool:
            with pinned(r, options, k) as session:
                (done,) = session.run([("EVAL", _COMPLETE, 1, k, retain, "c:" + token)])
                return bool(done)

        return self._client.call(run)

    def release(self, key: str, token: str) -> None:
        self._run(self._release, key, "c:" + token)

    def atomic_once(self, key: str, effect: Callable[[Any], object], retain_ms: int | None) -> bool:
        k = self.key(key)

        def attempt(r: Any) -> bool:
            with r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(k)
                        if pipe.get(k) == b"d":
                            return False
                        pipe.multi()
                        effect(pipe)
                        pipe.set(k, "d", px=retain_ms)
                        pipe.execute()
                        return True
                    except redis.WatchError:
                        continue  # changed, or the connection died while watching: look again

        def replicated(r: Any) -> bool:
            with pinned(r, self._client.options, k) as session:
                while True:
                    _, state = session.run([("WATCH", k), ("GET", k)], wait=False)
                    if state == b"d":
                        session.run([("UNWATCH",)], wait=False)
                        return False
                    rec: Any = Recorder()
                    effect(rec)
                    rec.set(k, "d", px=retain_ms)
                    if session.run(rec.commands, transaction=True) is not None:
                        return True  # else changed while watched: look again

        return self._client.call(replicated if self._client.options.min_replicas else attempt)

    def state(self, key: str) -> str | None:
        v = self._client.call(lambda r: r.get(self.key(key)))
        if v is None:
            return None
        return "done" if v == b"d" else "claimed"

    def forget(self, key: str) -> None:
        self._client.call(lambda r: r.delete(self.key(key)))

    def purge_expired(self) -> int:
        return -1  # Redis expires the keys itself

    def close(self) -> None:
        pass
