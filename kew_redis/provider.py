"""``redis://`` and ``rediss://``: queues on Redis Streams.

A queue is a stream with one consumer group (``kew``); its dead letters a
second stream; its delayed messages a sorted set scored by due time, moved
into the stream by a Lua script (atomically, so a restart loses none and no
worker holds them in memory).  Keys are ``<prefix>:{<queue>}...``: the hash
tag keeps a queue's keys in one slot, so the provider works on Cluster.

Crash recovery: an entry stays in the group's pending list until acked;
an entry idle longer than the lease is reclaimed with XAUTOCLAIM by any
consumer.  While a delivery is held, its consumer resets the idle time
(XCLAIM ... JUSTID) every lease/3, so a long handler is never stolen from a
live worker.  Acked entries are deleted (XACK + XDEL), so streams do not grow.

Entries another program wrote are read one by one (kew.qchan.spi.wire): an
entry kew cannot read is dead-lettered at once with the reason, and the
others of its batch are delivered.  A consumer group destroyed, or a stream
deleted, by another program is created again by the next fetch.

Options: ``prefix`` (default ``kew``), ``lease`` (seconds, default 30),
``retries`` (reconnect attempts before BrokerUnavailable, default 10),
``socket_timeout`` (seconds, default 10), ``max_message_size`` (bytes,
default 64 MiB), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``
(rediss:// only).  The URL path is the database number.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgspec
import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kew.qchan.spi import (
    BrokerUnavailable,
    Capability,
    ConfigError,
    DeadLetter,
    Delivery,
    Message,
    MessageTooLarge,
    ProviderURL,
    QueueStats,
    now_ms,
)
from kew.qchan.spi.dedupe import ClaimResult
from kew.qchan.spi.wire import Malformed, check_id, headers_from_json, salvage

log = logging.getLogger("kew.redis")

SCHEMES = ("redis", "rediss")
GROUP = "kew"
#: How often (ms) a busy consumer moves due delayed messages and reclaims idle entries.
HOUSEKEEPING_MS = 250
R = TypeVar("R")

_encode_headers = msgspec.json.Encoder().encode

# Move due delayed messages into the stream; returns the due time (epoch ms)
# of the next delayed message, or nil.  A delayed message is packed as
# "<len(id)>:<id><len(headers)>:<headers><body>" (see _pack); a member that
# is not (another program wrote it) goes to the dead letters, whole, as the
# body (its id "delayed-<now>-<n>").  What the fields hold is checked by the
# consumer, as for any entry.
_MOVE_DUE = """
local function field(s, p)
  local n = string.match(s, '^%d+:', p)
  if not n then return nil end
  local len = tonumber(string.sub(n, 1, -2))
  local from = p + #n
  if from + len - 1 > #s then return nil end
  return string.sub(s, from, from + len - 1), from + len
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for i, s in ipairs(due) do
  local id, p = field(s, 1)
  local headers
  if id then headers, p = field(s, p) end
  if headers then
    redis.call('XADD', KEYS[2], '*', 'id', id, 'body', string.sub(s, p), 'headers', headers)
  else
    redis.call('XADD', KEYS[3], '*', 'id', 'delayed-' .. ARGV[1] .. '-' .. i, 'body', s,
      'headers', '{}', 'count', 0, 'reason', ARGV[2], 'dead_at', ARGV[1])
  end
  redis.call('ZREM', KEYS[1], s)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return first[2] end
return false
"""


_BAD_DELAYED = str(
    Malformed(
        "a delayed message (sorted-set member) that is not "
        "<len(id)>:<id><len(headers)>:<headers><body>"
    )
)


def _pack(message_id: str, headers: bytes, body: bytes) -> bytes:
    mid = message_id.encode()
    return b"%d:%s%d:%s%s" % (len(mid), mid, len(headers), headers, body)


def _due(score: Any) -> int | None:
    """The mover's answer (a sorted-set score): epoch ms, or None for none
    (or a score that is never due, ``inf`` or ``nan``: another program's)."""
    if score is None:
        return None
    try:
        due = float(_text(score))
    except ValueError:
        return None
    if math.isnan(due) or due == math.inf:
        return None
    return 0 if due == -math.inf else int(due)


# -- entries ---------------------------------------------------------------

_FIELDS = (b"id", b"body", b"headers")


def _message(fields: Mapping[bytes, Any]) -> Message:
    """The message of a stream entry (fields ``id``, ``body``, ``headers``;
    others are ignored), or :class:`Malformed` saying what is wrong."""
    if not any(f in fields for f in _FIELDS):
        names = ", ".join(sorted(repr(k.decode(errors="replace")) for k in fields))
        raise Malformed(f"a stream entry without kew's fields id, body, headers (it has {names})")
    mid = check_id(fields.get(b"id"))
    body = fields.get(b"body")
    if body is None:
        raise Malformed("the stream entry has no body field")
    headers = fields.get(b"headers")
    if headers is None:
        raise Malformed("the stream entry has no headers field")
    return Message(mid, body, headers_from_json(headers))


def _salvaged(entry_id: str, fields: Mapping[bytes, Any]) -> Message:
    """What can be kept of an entry kew cannot read (the entry id stands in
    for a missing or bad message id)."""
    raw = fields.get(b"headers")
    try:
        headers = msgspec.json.decode(raw) if isinstance(raw, bytes) else None
    except msgspec.DecodeError:
        headers = None
    return salvage(
        fields.get(b"id"),
        fields.get(b"body"),
        headers if isinstance(headers, dict) else None,
        fallback_id=entry_id,
    )


def _int(raw: Any, default: int) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return default


def _dead_letter(entry_id: Any, fields: Mapping[bytes, Any]) -> DeadLetter:
    """A dead-letter entry, read leniently (another program may have written
    it): whatever is missing or unreadable gets a stand-in."""
    eid = _text(entry_id)
    reason = fields.get(b"reason")
    return DeadLetter(
        _salvaged(eid, fields),
        _int(fields.get(b"count"), 1),
        reason.decode(errors="replace") if isinstance(reason, bytes) else "(no reason recorded)",
        _int(fields.get(b"dead_at"), _int(eid.partition("-")[0], 0)),
    )


def _dead_fields(m: Message, count: int, reason: str) -> dict[str, Any]:
    return {
        "id": m.id,
        "body": m.body,
        "headers": _encode_headers(m.headers),
        "count": count,
        "reason": reason,
        "dead_at": now_ms(),
    }


# -- options ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    ssl: dict[str, str]
    prefix: str
    lease_ms: int
    retries: int
    socket_timeout: float
    max_message_size: int

    @classmethod
    def from_url(cls, url: str) -> Options:
        p = ProviderURL.parse(url, SCHEMES)
        if len(p.hosts) > 1:
            raise ConfigError(f"one Redis host per URL, not {len(p.hosts)}: {p.redacted!r}")
        host, port = p.hosts[0] if p.hosts else ("127.0.0.1", None)
        try:
            db = int(p.path.strip("/") or 0)
        except ValueError:
            raise ConfigError(f"the URL path must be a database number: {p.redacted!r}") from None
        tls = p.scheme == "rediss"
        ssl = {
            k: v
            for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
            if (v := p.get_str(k)) is not None
        }
        if ssl and not tls:
            raise ConfigError(f"TLS files need a rediss:// URL: {p.redacted!r}")
        options = cls(
            host=host or "127.0.0.1",
            port=port or 6379,
            db=db,
            username=p.username,
            password=p.password,
            tls=tls,
            ssl=ssl,
            prefix=p.get_str("prefix", "kew") or "kew",
            lease_ms=round(p.get_float("lease", 30.0, minimum=0.1) * 1000),
            retries=p.get_int("retries", 10),
            socket_timeout=p.get_float("socket_timeout", 10.0, minimum=0.1),
            max_message_size=p.get_int("max_message_size", 64 * 1024 * 1024, minimum=1),
        )
        p.finish()
        return options

    def client(self) -> Any:
        # redis-py annotates results for its sync and async clients at once
        # (unions with Awaitable); results are read as Any and checked here.
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            ssl=self.tls,
            ssl_ca_certs=self.ssl.get("ssl_ca_certs"),
            ssl_certfile=self.ssl.get("ssl_certfile"),
            ssl_keyfile=self.ssl.get("ssl_keyfile"),
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), self.retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )


@dataclass(frozen=True)
class _Keys:
    stream: str
    dead: str
    delayed: str

    @classmethod
    def of(cls, prefix: str, queue: str) -> _Keys:
        base = f"{prefix}:{{{queue}}}"
        return cls(base, f"{base}:dead", f"{base}:delayed")


def _guard(url: str, fn: Callable[[], R]) -> R:
    """Run a Redis call; once redis-py's retries are spent, say so clearly."""
    try:
        return fn()
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise BrokerUnavailable(f"Redis at {url} is unreachable: {e}") from None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- connector -------------------------------------------------------------


class RedisConnector:
    lacks: dict[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = ProviderURL.parse(url, SCHEMES).redacted
        self.max_message_size = self.options.max_message_size
        self.redis = self.options.client()
        self._move_due = self.redis.register_script(_MOVE_DUE)

    def __repr__(self) -> str:
        return f"RedisConnector({self.url!r})"

    def keys(self, queue: str) -> _Keys:
        return _Keys.of(self.options.prefix, queue)

    def move_due(self, keys: _Keys, client: Any = None) -> int | None:
        """Move due delayed messages into the stream; the next due time."""
        return _due(
            self._move_due(
                keys=[keys.delayed, keys.stream, keys.dead],
                args=[now_ms(), _BAD_DELAYED],
                client=client or self.redis,
            )
        )

    def declare(self, queue: str) -> None:
        try:
            _guard(
                self.url,
                lambda: self.redis.xgroup_create(
                    self.keys(queue).stream, GROUP, "0", mkstream=True
                ),
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def producer(self, queue: str) -> RedisProducer:
        return RedisProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> RedisConsumer:
        self.declare(queue)
        return RedisConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> RedisBrowser:
        return RedisBrowser(self, queue)

    def delete(self, queue: str) -> None:
        k = self.keys(queue)
        _guard(self.url, lambda: self.redis.delete(k.stream, k.dead, k.delayed))

    def dedupe_store(self, namespace: str) -> RedisDedupeStore:
        """Records for ``kew.idempotency`` on this Redis (one key each)."""
        return RedisDedupeStore(self, namespace)

    def close(self) -> None:
        self.redis.close()


# -- producer --------------------------------------------------------------


def _add(connector: RedisConnector, pipe: Any, keys: _Keys, queue: str, m: Message) -> None:
    """Queue the commands that store ``m`` on ``queue`` in ``pipe``."""
    if len(m.body) > connector.max_message_size:
        raise MessageTooLarge(len(m.body), connector.max_message_size, queue)
    headers = _encode_headers(m.headers)
    if m.deliver_at is not None and m.deliver_at > now_ms():
        pipe.zadd(keys.delayed, {_pack(m.id, headers, m.body): m.deliver_at})
    else:
        pipe.xadd(keys.stream, {"id": m.id, "body": m.body, "headers": headers})


class RedisProducer:
    def __init__(self, connector: RedisConnector, queue: str) -> None:
        self._c = connector
        self._keys = connector.keys(queue)
        self._queue = queue

    def _add(self, pipe: Any, m: Message) -> None:
        _add(self._c, pipe, self._keys, self._queue, m)

    def send(self, message: Message) -> None:
        self.send_many((message,))

    def send_many(self, messages: Sequence[Message]) -> None:
        pipe = self._c.redis.pipeline(transaction=False)  # one round trip for the batch
        for m in messages:
            self._add(pipe, m)
        _guard(self._c.url, pipe.execute)

    def close(self) -> None:
        pass


# -- consumer --------------------------------------------------------------


class RedisConsumer:
    def __init__(self, connector: RedisConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._keys = connector.keys(queue)
        self._prefetch = prefetch
        self._lease = connector.options.lease_ms
        self._name = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"
        # A blocking XREADGROUP holds its connection: the consumer has its own.
        self._redis = connector.options.client()
        self._held: dict[str, Delivery] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._housekeeping_at = 0  # epoch ms: next run of the mover and the reclaim
        self._next_due: int | None = None  # epoch ms of the next delayed message
        self._keeper = threading.Thread(
            target=self._keep_leases, name="kew-redis-lease", daemon=True
        )
        self._keeper.start()

    def _deliveries(self, entries: Any, counts: dict[str, int] | None = None) -> list[Delivery]:
        """The deliveries of the entries read (now pending on this consumer),
        held; an entry kew cannot read is dead-lettered at once, one deleted
        while pending (no fields) is acked: neither is left pending."""
        out: list[Delivery] = []
        bad: list[tuple[str, Message, int, str]] = []
        gone: list[str] = []
        for entry_id, fields in entries:
            eid = _text(entry_id)
            count = (counts or {}).get(eid, 1)
            if not fields:
                gone.append(eid)
                continue
            try:
                out.append(Delivery(_message(fields), count, eid))
            except Malformed as e:
                bad.append((eid, _salvaged(eid, fields), count, str(e)))
        if bad or gone:
            self._bury(bad, gone)
        with self._lock:
            for d in out:
                self._held[cast(str, d.tag)] = d
        return out

    def _bury(self, bad: list[tuple[str, Message, int, str]], gone: list[str]) -> None:
        """Dead-letter ``bad`` (entry id, what was kept, count, reason) as
        :meth:`dead_letter` does, and ack ``gone``, in one MULTI/EXEC.  If it
        fails, the good entries of the batch are not held either: all are
        reclaimed after the lease."""
        pipe = self._redis.pipeline(transaction=True)
        for _, m, count, reason in bad:
            pipe.xadd(self._keys.dead, _dead_fields(m, count, reason))
        tags = [eid for eid, *_ in bad] + gone
        pipe.xack(self._keys.stream, GROUP, *tags)
        pipe.xdel(self._keys.stream, *tags)
        pipe.execute()
        for eid, m, _, reason in bad:
            log.warning(
                "kew: dead-lettered entry %s of %s (message id %r): %s",
                eid,
                self._keys.stream,
                m.id,
                reason,
            )

    def _reclaim(self, room: int) -> list[Delivery]:
        r = self._redis
        _, entries, _ = r.xautoclaim(
            self._keys.stream, GROUP, self._name, self._lease, "0-0", count=room
        )
        if not entries:
            return []
        pipe = r.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self._keys.stream, GROUP, entry_id, entry_id, 1)
        counts = {}
        for info in pipe.execute():
            if info:
                counts[_text(info[0]["message_id"])] = int(info[0]["times_delivered"])
        return self._deliveries(entries, counts)

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        recreated = False
        while not self._closed.is_set():
            with self._lock:
                room = min(max_count, self._prefetch - len(self._held))
            if room <= 0:
                self._closed.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    return []
                continue
            try:
                got = _guard(self._c.url, functools.partial(self._next, room, deadline))
            except ResponseError as e:
                if "NOGROUP" not in str(e) or recreated:
                    raise  # the runtime retries
                # Another program destroyed the group or deleted the stream.
                log.warning("kew: %s; creating the group again", e)
                self._c.declare(self._queue)
                recreated = True
                continue
            if got or time.monotonic() >= deadline:
                return got
        return []

    def _next(self, room: int, deadline: float) -> list[Delivery]:
        # One round trip per fetch while the queue is busy: the delayed-message
        # mover and the reclaim of idle (crashed or handed back) entries run at
        # most every HOUSEKEEPING seconds, and whenever a known delayed message
        # is due.
        r = self._redis
        now = now_ms()
        if now >= self._housekeeping_at or (self._next_due is not None and now >= self._next_due):
            self._next_due = self._c.move_due(self._keys, r)
            self._housekeeping_at = now + HOUSEKEEPING_MS
            got = self._reclaim(room)
            if got:
                return got
        # Block for new entries, but wake for the next delayed one and the next
        # housekeeping (never late by more than HOUSEKEEPING seconds).
        block = max(0.0, deadline - time.monotonic())
        wake = (
            self._housekeeping_at
            if self._next_due is None
            else min(self._housekeeping_at, self._next_due)
        )
        block = min(block, max(0.0, (wake - now) / 1000), self._lease / 3000)
        reply = r.xreadgroup(
            GROUP,
            self._name,
            {self._keys.stream: ">"},
            count=room,
            block=max(1, round(block * 1000)),
        )
        return self._deliveries(reply[0][1]) if reply else []

    def _forget(self, delivery: Delivery) -> bool:
        with self._lock:
            return self._held.pop(cast(str, delivery.tag), None) is not None

    def ack(self, delivery: Delivery) -> None:
        if not self._forget(delivery):
            return
        # No MULTI: XACK settles; the XDEL that follows on the same connection
        # only keeps the stream short (an acked entry is never delivered again).
        pipe = self._redis.pipeline(transaction=False)
        pipe.xack(self._keys.stream, GROUP, delivery.tag)
        pipe.xdel(self._keys.stream, delivery.tag)
        _guard(self._c.url, pipe.execute)

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: XADDs (or ZADDs) and XACK + XDEL in one MULTI/EXEC
        on this consumer's connection: one round trip, all or nothing."""
        pipe = self._redis.pipeline(transaction=True)
        for queue, m in sends:
            _add(self._c, pipe, self._c.keys(queue), queue, m)
        tags = [cast(str, d.tag) for d in acks if self._forget(d)]
        if tags:
            pipe.xack(self._keys.stream, GROUP, *tags)
            pipe.xdel(self._keys.stream, *tags)
        if sends or tags:
            _guard(self._c.url, pipe.execute)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if not self._forget(delivery):
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self._keys.dead, _dead_fields(delivery.message, delivery.delivery_count, reason))
        pipe.xack(self._keys.stream, GROUP, delivery.tag)
        pipe.xdel(self._keys.stream, delivery.tag)
        _guard(self._c.url, pipe.execute)

    def _hand_back(self, tags: list[str]) -> None:
        # Make the entries look idle past the lease: the next XAUTOCLAIM takes them.
        if tags:
            self._redis.xclaim(
                self._keys.stream, GROUP, self._name, 0, tags, idle=self._lease + 1, justid=True
            )

    def release(self, delivery: Delivery) -> None:
        if self._forget(delivery):
            _guard(self._c.url, lambda: self._hand_back([cast(str, delivery.tag)]))

    def _keep_leases(self) -> None:
        while not self._closed.wait(self._lease / 3000):
            with self._lock:
                tags = list(self._held)
            if not tags:
                continue
            try:
                self._redis.xclaim(self._keys.stream, GROUP, self._name, 0, tags, justid=True)
            except redis.RedisError:
                continue  # two more tries before the lease runs out
            except Exception:  # never let this thread die: the leases would lapse
                log.exception("kew: renewing the leases on %s failed", self._keys.stream)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._keeper.join()
        with self._lock:
            tags = list(self._held)
            self._held.clear()
        with contextlib.suppress(redis.RedisError):  # else the lease runs out instead
            self._hand_back(tags)
        self._redis.close()


# -- browser ---------------------------------------------------------------


class RedisBrowser:
    def __init__(self, connector: RedisConnector, queue: str) -> None:
        self._c = connector
        self._r = connector.redis
        self._keys = connector.keys(queue)

    def _undelivered(self, limit: int) -> list[Any]:
        try:
            groups = self._r.xinfo_groups(self._keys.stream)
        except ResponseError as e:
            if "no such key" in str(e).lower():
                return []  # not declared, or deleted
            raise
        last = next(
            (_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == GROUP), "0-0"
        )
        return cast(list[Any], self._r.xrange(self._keys.stream, f"({last}", "+", count=limit))

    def peek(self, limit: int) -> Sequence[Message]:
        """Entries a consumer will dead-letter are shown as they will be kept."""
        _guard(self._c.url, lambda: self._c.move_due(self._keys))
        out = []
        for entry_id, f in _guard(self._c.url, lambda: self._undelivered(limit)):
            try:
                out.append(_message(f))
            except Malformed:
                out.append(_salvaged(_text(entry_id), f))
        return out

    def stats(self) -> QueueStats:
        k = self._keys
        pipe = self._r.pipeline(transaction=False)
        pipe.xlen(k.stream)
        pipe.xpending(k.stream, GROUP)
        pipe.zcard(k.delayed)
        pipe.xlen(k.dead)
        length, pending, delayed, dead = _guard(
            self._c.url, lambda: pipe.execute(raise_on_error=False)
        )
        for reply in (length, delayed, dead):
            if isinstance(reply, Exception):
                raise reply
        if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
            pending = {"pending": 0}  # the group is gone: its consumers create it again
        elif isinstance(pending, Exception):
            raise pending
        in_flight = int(pending["pending"])
        return QueueStats(int(length) - in_flight, in_flight, int(delayed), int(dead))

    def _dead_entries(self, ids: Collection[str] | None) -> list[tuple[Any, DeadLetter]]:
        entries = self._r.xrange(self._keys.dead, "-", "+")
        out = [(e, _dead_letter(e, f)) for e, f in entries if f]
        return [(e, d) for e, d in out if ids is None or d.message.id in ids]

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        entries = _guard(
            self._c.url, lambda: self._r.xrange(self._keys.dead, "-", "+", count=limit)
        )
        return [_dead_letter(e, f) for e, f in entries if f]

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Each back as kew reads it (an entry that was not kew's as what was
        kept of it: its id, or the entry id, the body, the good headers)."""
        entries = _guard(self._c.url, lambda: self._dead_entries(ids))
        pipe = self._r.pipeline(transaction=True)
        for entry_id, d in entries:
            m = d.message
            pipe.xadd(
                self._keys.stream,
                {"id": m.id, "body": m.body, "headers": _encode_headers(m.headers)},
            )
            pipe.xdel(self._keys.dead, entry_id)
        _guard(self._c.url, pipe.execute)
        return len(entries)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        entries = _guard(self._c.url, lambda: self._dead_entries(ids))
        if entries:
            _guard(self._c.url, lambda: self._r.xdel(self._keys.dead, *[e[0] for e in entries]))
        return len(entries)

    def purge(self) -> int:
        entries = _guard(self._c.url, lambda: self._undelivered(1_000_000))
        pipe = self._r.pipeline(transaction=True)
        pipe.zcard(self._keys.delayed)
        pipe.delete(self._keys.delayed)
        if entries:
            pipe.xdel(self._keys.stream, *[e[0] for e in entries])
        delayed = _guard(self._c.url, pipe.execute)[0]
        return len(entries) + int(delayed)

    def close(self) -> None:
        pass


# -- dedupe store (kew.idempotency) ------------------------------------------

# One key per record: "d" (done; PX retention, or no expiry) or "c:<token>"
# (claimed; PX lease).  Expiry does the clean-up.
_ONCE_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v == 'd' then return 'done' end
if v and v ~= ARGV[1] then return 'held' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'claimed'
"""
_ONCE_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_ONCE_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if ARGV[1] == '' then redis.call('SET', KEYS[1], 'd')
else redis.call('SET', KEYS[1], 'd', 'PX', ARGV[1]) end
if (not v) or v == ARGV[2] then return 1 end
return 0
"""
_ONCE_RELEASE = """
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

    def __init__(self, connector: RedisConnector, namespace: str) -> None:
        self.namespace = namespace
        self._c = connector
        self._r = connector.redis
        self._base = f"{connector.options.prefix}:once:{{{namespace}}}:"
        self._claim = self._r.register_script(_ONCE_CLAIM)
        self._extend = self._r.register_script(_ONCE_EXTEND)
        self._complete = self._r.register_script(_ONCE_COMPLETE)
        self._release = self._r.register_script(_ONCE_RELEASE)

    def __repr__(self) -> str:
        return f"RedisDedupeStore({self.namespace!r}, {self._c.url!r})"

    def key(self, key: str) -> str:
        return self._base + key

    def claim(self, key: str, token: str, lease_ms: int) -> ClaimResult:
        k = self.key(key)
        got = _guard(self._c.url, lambda: self._claim(keys=[k], args=["c:" + token, lease_ms]))
        return ClaimResult(_text(got))

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        k = self.key(key)
        return bool(
            _guard(self._c.url, lambda: self._extend(keys=[k], args=["c:" + token, lease_ms]))
        )

    def complete(self, key: str, token: str, retain_ms: int | None) -> bool:
        k, retain = self.key(key), "" if retain_ms is None else str(retain_ms)
        return bool(
            _guard(self._c.url, lambda: self._complete(keys=[k], args=[retain, "c:" + token]))
        )

    def release(self, key: str, token: str) -> None:
        k = self.key(key)
        _guard(self._c.url, lambda: self._release(keys=[k], args=["c:" + token]))

    def atomic_once(self, key: str, effect: Callable[[Any], object], retain_ms: int | None) -> bool:
        k = self.key(key)

        def attempt() -> bool:
            with self._r.pipeline(transaction=True) as pipe:
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

        return _guard(self._c.url, attempt)

    def state(self, key: str) -> str | None:
        v = _guard(self._c.url, lambda: self._r.get(self.key(key)))
        if v is None:
            return None
        return "done" if v == b"d" else "claimed"

    def forget(self, key: str) -> None:
        _guard(self._c.url, lambda: self._r.delete(self.key(key)))

    def purge_expired(self) -> int:
        return -1  # Redis expires the keys itself

    def close(self) -> None:
        pass


def connect(url: str) -> RedisConnector:
    return RedisConnector(url)
