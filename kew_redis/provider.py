"""``redis://``, ``rediss://`` and ``unix://``: queues on Redis Streams.

What the broker gives: a queue is a stream with one consumer group
(``kew``); its dead letters a second stream; its delayed messages a sorted
set scored by due time, moved into the stream by a Lua script (atomically,
so a restart loses none and no worker holds them in memory).

Keys: ``<prefix>:{<queue>}`` (the stream), ``<prefix>:{<queue>}:delayed``
and ``<prefix>:{<queue>}:dead``; the hash tag keeps a queue's keys in one
slot, so every MULTI of one queue works on Cluster.  ``kew.idempotency``
records are ``<prefix>:once:{<namespace>}:<key>`` (:mod:`kew_redis._dedupe`).

Crash recovery: an entry stays in the group's pending list until acked; an
entry idle longer than the lease is reclaimed with XAUTOCLAIM by any
consumer.  While a delivery is held, its consumer resets the idle time
(XCLAIM ... JUSTID) every lease/3 (:class:`~kew.qchan.spi.kit.HeldLeases`),
so a long handler is never stolen from a live worker.  Acked entries are
deleted (XACK + XDEL), so streams do not grow.

Entries another program wrote are read one by one (kew.qchan.spi.wire): an
entry kew cannot read is dead-lettered at once with the reason, and the
others of its batch are delivered.  A consumer group destroyed, or a stream
deleted, by another program is created again by the next fetch.

Redis Cluster (several seed nodes in the URL, or ``cluster=yes``): redis-py's
``RedisCluster``; every MULTI stays in one queue's slot, and a settle's
sends to queues of other slots are stored before its MULTI acks
(:meth:`RedisConsumer.settle`).  ``min_replicas=N`` makes sends and
settles wait until N replicas have them (:mod:`kew_redis._writes`).

Options (:mod:`kew_redis._options`, docs/providers/redis.md): ``prefix``
(default ``kew``), ``lease`` (seconds, default 30), ``retries`` (attempts
after the first before BrokerUnavailable, default 10, 20 on Cluster),
``max_message_size`` (bytes, default 64 MiB), ``cluster``, ``min_replicas``,
``replica_timeout``, and redis-py's ``db``, ``socket_timeout``,
``socket_connect_timeout``, ``socket_keepalive``, ``health_check_interval``,
``client_name`` and ``ssl_*`` (``rediss://``).  No network I/O happens
before the first operation; its errors are kew's (:mod:`kew_redis._client`),
and a child process made by fork gets its own connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    Capability,
    ConfigError,
    ConnectorBase,
    ConsumerFailed,
    DeadLetter,
    Delivery,
    KewError,
    Message,
    MessageTooLarge,
    QueueStats,
    SendError,
    now_ms,
)
from kew.qchan.spi.kit import HeldLeases
from kew.qchan.spi.wire import Malformed
from kew_redis import _entries as entry
from kew_redis._client import Client, script
from kew_redis._dedupe import RedisDedupeStore
from kew_redis._options import SCHEMES, Options
from kew_redis._reading import GROUP, Housekeeping, buried, bury, pending_counts
from kew_redis._writes import write, write_all, write_spread

__all__ = ["SCHEMES", "Options", "RedisConnector", "RedisDedupeStore", "connect"]

log = logging.getLogger("kew.redis")

# -- connector -------------------------------------------------------------


@dataclass(frozen=True)
class _Keys:
    stream: str
    dead: str
    delayed: str

    @classmethod
    def of(cls, prefix: str, queue: str) -> _Keys:
        base = f"{prefix}:{{{queue}}}"
        return cls(base, f"{base}:dead", f"{base}:delayed")


class RedisConnector(ConnectorBase):
    lacks: Mapping[Capability, str] = {}

    def __init__(self, url: str) -> None:
        self.options = Options.from_url(url)
        self.url = self.options.url  # the password masked
        self.max_message_size = self.options.max_message_size
        self.client = Client(self.options)
        self._move_due = script(entry.MOVE_DUE)

    def __repr__(self) -> str:
        return f"RedisConnector({self.url!r})"

    @property
    def redis(self) -> Any:
        """The redis-py client of this process (for code that shares the
        server, e.g. examples/omero_import); kew's errors only come from
        the provider's own calls."""
        return self.client.get()

    def keys(self, queue: str) -> _Keys:
        return _Keys.of(self.options.prefix, queue)

    def same_slot(self, queue: str, other: str) -> bool:
        """Whether the keys of two queues can be in one MULTI: always on one
        server; on Redis Cluster, if their hash tags map to one slot."""
        if not self.options.cluster or queue == other:
            return True
        slots = {key_slot(self.keys(q).stream.encode()) for q in (queue, other)}
        return len(slots) == 1

    def move_due(self, keys: _Keys, r: Any) -> int | None:
        """Move due delayed messages into the stream; the next due time."""
        return entry.due(
            self._move_due(
                keys=[keys.delayed, keys.stream, keys.dead],
                args=[now_ms(), entry.BAD_DELAYED],
                client=r,
            )
        )

    def declare(self, queue: str) -> None:
        stream = self.keys(queue).stream

        def create(r: Any) -> None:
            try:
                r.xgroup_create(stream, GROUP, "0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        self.client.call(create)

    def producer(self, queue: str) -> RedisProducer:
        return RedisProducer(self, queue)

    def consumer(self, queue: str, prefetch: int) -> RedisConsumer:
        self.declare(queue)
        return RedisConsumer(self, queue, prefetch)

    def browser(self, queue: str) -> RedisBrowser:
        return RedisBrowser(self, queue)

    def delete(self, queue: str) -> None:
        k = self.keys(queue)
        self.client.call(lambda r: r.delete(k.stream, k.dead, k.delayed))

    def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``MultiSender``: the XADDs (ZADDs for delayed messages) of every
        queue in one round trip: one ``MULTI``/``EXEC`` when the queues share
        a slot (always on one server), else one pipeline (on Cluster,
        redis-py sends each node its share); with ``min_replicas``,
        confirmed by the replicas (:func:`~kew_redis._writes.write_all`)."""
        for queue, m in sends:
            _check_size(self, queue, m)  # all checked before anything is written
        writes = [(self.keys(q).stream, functools.partial(_add_to, self, q, m)) for q, m in sends]
        options = self.options
        self.client.call(lambda r: write_all(r, options, writes), refused=SendError)

    def aio(self) -> Any:
        """The native async route (``kew.aio``): a
        :class:`kew_redis._aio.RedisAsyncConnector` on redis.asyncio (sends
        share round trips, fetches block on the event loop); no I/O here."""
        from kew_redis._aio import RedisAsyncConnector  # (it imports this module)

        return RedisAsyncConnector(self)

    def dedupe_store(self, namespace: str) -> RedisDedupeStore:
        """Records for ``kew.idempotency`` on this Redis (one key each)."""
        return RedisDedupeStore(self.client, self.options.prefix, namespace)

    def close(self) -> None:
        self.client.close()


def connect(url: str) -> RedisConnector:
    """The provider's entry point (``kew.providers``): no I/O until used."""
    return RedisConnector(url)


# -- producer --------------------------------------------------------------


def _check_size(connector: RedisConnector, queue: str, m: Message) -> None:
    if len(m.body) > connector.max_message_size:
        raise MessageTooLarge(len(m.body), connector.max_message_size, queue)


def _add(connector: RedisConnector, pipe: Any, keys: _Keys, queue: str, m: Message) -> None:
    """Queue the commands that store ``m`` on ``queue`` in ``pipe``."""
    _check_size(connector, queue, m)
    headers = entry.encode_headers(m.headers)
    if m.deliver_at is not None and m.deliver_at > now_ms():
        pipe.zadd(keys.delayed, {entry.pack(m.id, headers, m.body): m.deliver_at})
    else:
        pipe.xadd(keys.stream, {"id": m.id, "body": m.body, "headers": headers})


def _add_to(connector: RedisConnector, queue: str, m: Message, pipe: Any) -> None:
    _add(connector, pipe, connector.keys(queue), queue, m)


class RedisProducer:
    def __init__(self, connector: RedisConnector, queue: str) -> None:
        self._c = connector
        self._keys = connector.keys(queue)
        self._queue = queue

    def send(self, message: Message) -> None:
        self.send_many((message,))

    def send_many(self, messages: Sequence[Message]) -> None:
        def build(pipe: Any) -> None:  # one round trip for the batch
            for m in messages:
                _add(self._c, pipe, self._keys, self._queue, m)

        options = self._c.options
        self._c.client.call(
            lambda r: write(r, options, self._keys.stream, build, transaction=False),
            refused=SendError,
        )

    def close(self) -> None:
        pass


# -- consumer --------------------------------------------------------------


class _NoGroup(Exception):
    """The group is gone (another program destroyed it or deleted the stream)."""


class RedisConsumer:
    def __init__(self, connector: RedisConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._keys = connector.keys(queue)
        self._prefetch = prefetch
        self._lease = connector.options.lease_ms
        self._name = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"
        # A blocking XREADGROUP holds its connection: the consumer has its own.
        self._client = Client(connector.options)
        self._closed = threading.Event()
        self._renewing = threading.Lock()  # close() waits for a renewal under way
        self._housekeeping = Housekeeping()
        self._held: HeldLeases[str] = HeldLeases(
            self._renew, self._lease / 3000, name="kew-redis-lease"
        )

    def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` deliveries
        (``WindowedConsumer``): a pull consumer takes only what ``fetch``
        asks for, so the bound is all there is to move."""
        self._prefetch = count

    # The deliveries of a fetch.

    def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        recreated = False
        while not self._closed.is_set():
            room = self._held.room(self._prefetch, max_count)
            if room <= 0:
                self._closed.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    return []
                continue
            try:
                fn = functools.partial(self._next, room=room, deadline=deadline)
                got = self._client.call(fn, stop=self._closed)
            except _NoGroup as e:
                if recreated:
                    raise BrokerUnavailable(f"{self._keys.stream}: {e}") from None
                log.warning("kew: %s; creating the group again", e)
                self._c.declare(self._queue)
                recreated = True
                continue
            except (AccessRefused, ConfigError) as e:
                raise ConsumerFailed(f"the consumer of {self._queue!r} cannot go on: {e}") from e
            if got or time.monotonic() >= deadline:
                return got
        return []

    def _next(self, r: Any, room: int, deadline: float) -> list[Delivery]:
        # One round trip per fetch while the queue is busy: the delayed-message
        # mover and the reclaim of idle (crashed or handed back) entries run at
        # most every HOUSEKEEPING_MS, and whenever a known delayed message is
        # due (kew_redis._reading.Housekeeping).
        try:
            now = now_ms()
            chores = self._housekeeping
            if chores.due(now):
                chores.done(now, self._c.move_due(self._keys, r))
                got = self._reclaim(r, room)
                if got:
                    return got
            reply = r.xreadgroup(
                GROUP,
                self._name,
                {self._keys.stream: ">"},
                count=room,
                block=chores.block_ms(now, deadline, self._lease),
            )
            return self._deliveries(r, reply[0][1]) if reply else []
        except ResponseError as e:
            if "NOGROUP" in str(e):
                raise _NoGroup(str(e)) from None
            raise

    def _reclaim(self, r: Any, room: int) -> list[Delivery]:
        _, entries, _ = r.xautoclaim(
            self._keys.stream, GROUP, self._name, self._lease, "0-0", count=room
        )
        if not entries:
            return []
        pipe = r.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self._keys.stream, GROUP, entry_id, entry_id, 1)
        return self._deliveries(r, entries, pending_counts(pipe.execute()))

    def _deliveries(
        self, r: Any, entries: Any, counts: dict[str, int] | None = None
    ) -> list[Delivery]:
        """The deliveries of the entries read (now pending on this consumer),
        held; an entry kew cannot read is dead-lettered at once, one deleted
        while pending (no fields) is acked, in one MULTI/EXEC: neither is
        left pending.  If that fails, the good entries of the batch are not
        held either: all are reclaimed after the lease."""
        out, bad, gone = entry.sort_out(entries, counts)
        if bad or gone:
            pipe = r.pipeline(transaction=True)
            bury(pipe, self._keys.stream, self._keys.dead, bad, gone)
            pipe.execute()
            buried(self._keys.stream, bad)
        hold = self._held.add
        for d in out:
            hold(cast(str, d.tag), d)
        return out

    # Settling.

    def _take(self, deliveries: Sequence[Delivery]) -> list[str]:
        """The entry ids of those still held, no longer held."""
        return self._held.take([cast(str, d.tag) for d in deliveries])

    def ack(self, delivery: Delivery) -> None:
        tags = self._take([delivery])
        if tags:
            self._client.call(lambda r: self._ack(r, tags))

    def _ack(self, r: Any, tags: list[str]) -> None:
        # No MULTI: XACK settles; the XDEL that follows on the same connection
        # only keeps the stream short (an acked entry is never delivered again).
        pipe = r.pipeline(transaction=False)
        pipe.xack(self._keys.stream, GROUP, *tags)
        pipe.xdel(self._keys.stream, *tags)
        pipe.execute()

    def settle(self, acks: Sequence[Delivery], sends: Sequence[tuple[str, Message]]) -> None:
        """Outbox settle: XADDs (or ZADDs) and XACK + XDEL in one MULTI/EXEC
        on this consumer's connection: one round trip, all or nothing.  On
        Redis Cluster, the sends to queues of other slots (a MULTI cannot
        span slots) are stored first, in a pipeline of their own; only then
        the MULTI of the rest and the acks (a failure in between: those
        sends are stored, the deliveries come again).  With min_replicas,
        each step is confirmed by the replicas before the next."""
        for queue, m in sends:
            _check_size(self._c, queue, m)  # before the acks are taken
        tags = self._take(acks)
        if not (sends or tags):
            return
        c = self._c
        here: list[tuple[str, Message]] = []
        there: list[tuple[str, Any]] = []  # (key, build) of another slot's sends
        for queue, m in sends:
            if c.same_slot(queue, self._queue):
                here.append((queue, m))
            else:
                there.append((c.keys(queue).stream, functools.partial(_add_to, c, queue, m)))
        if there:
            self._client.call(lambda r: write_spread(r, c.options, there), refused=SendError)
        if not here:  # the acks alone: as ack()
            if tags:
                self._client.call(lambda r: self._ack(r, tags))
            return

        def build(pipe: Any) -> None:
            for queue, m in here:
                _add(c, pipe, c.keys(queue), queue, m)
            if tags:
                pipe.xack(self._keys.stream, GROUP, *tags)
                pipe.xdel(self._keys.stream, *tags)

        self._client.call(
            lambda r: write(r, c.options, self._keys.stream, build, transaction=True),
            refused=SendError,
        )

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if not self._take([delivery]):
            return
        fields = entry.dead_fields(delivery.message, delivery.delivery_count, reason)

        def run(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.xadd(self._keys.dead, fields)
            pipe.xack(self._keys.stream, GROUP, delivery.tag)
            pipe.xdel(self._keys.stream, delivery.tag)
            pipe.execute()

        self._client.call(run)

    def _hand_back(self, r: Any, tags: list[str]) -> None:
        # Make the entries look idle past the lease: the next XAUTOCLAIM takes them.
        if tags:
            r.xclaim(
                self._keys.stream, GROUP, self._name, 0, tags, idle=self._lease + 1, justid=True
            )

    def release(self, delivery: Delivery) -> None:
        tags = self._take([delivery])
        if tags:
            self._client.call(lambda r: self._hand_back(r, tags))

    def _renew(self, tags: Sequence[str]) -> None:
        """Reset the idle time of the held entries (HeldLeases, every lease/3)."""
        with self._renewing:
            if self._closed.is_set():
                return
            try:
                self._client.get().xclaim(
                    self._keys.stream, GROUP, self._name, 0, list(tags), justid=True
                )
            except (redis.RedisError, RedisClusterException) as e:  # two more tries in the lease
                log.warning("kew: renewing the leases on %s failed: %s", self._keys.stream, e)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._renewing:
            tags = self._held.close()
        with contextlib.suppress(KewError):  # else the lease runs out instead
            self._client.call(lambda r: self._hand_back(r, tags), stop=self._closed)
        self._client.close()


# -- browser ---------------------------------------------------------------


class RedisBrowser:
    def __init__(self, connector: RedisConnector, queue: str) -> None:
        self._c = connector
        self._call = connector.client.call
        self._keys = connector.keys(queue)

    def _undelivered(self, r: Any, limit: int) -> list[Any]:
        try:
            groups = r.xinfo_groups(self._keys.stream)
        except ResponseError as e:
            if "no such key" in str(e).lower():
                return []  # not declared, or deleted
            raise
        last = next(
            (entry.text(g["last-delivered-id"]) for g in groups if entry.text(g["name"]) == GROUP),
            "0-0",
        )
        return cast(list[Any], r.xrange(self._keys.stream, f"({last}", "+", count=limit))

    def peek(self, limit: int) -> Sequence[Message]:
        """Entries a consumer will dead-letter are shown as they will be kept."""
        self._call(lambda r: self._c.move_due(self._keys, r))
        out = []
        for entry_id, f in self._call(lambda r: self._undelivered(r, limit)):
            try:
                out.append(entry.message(f))
            except Malformed:
                out.append(entry.salvaged(entry.text(entry_id), f))
        return out

    def stats(self) -> QueueStats:
        k = self._keys

        def run(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.xlen(k.stream)
            pipe.xpending(k.stream, GROUP)
            pipe.zcard(k.delayed)
            pipe.xlen(k.dead)
            replies = cast(list[Any], pipe.execute(raise_on_error=False))
            for i in (0, 2, 3):
                if isinstance(replies[i], Exception):
                    raise replies[i]
            pending = replies[1]
            if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
                replies[1] = {"pending": 0}  # the group is gone: its consumers create it again
            elif isinstance(pending, Exception):
                raise pending
            return replies

        length, pending, delayed, dead = self._call(run)
        in_flight = int(pending["pending"])
        return QueueStats(int(length) - in_flight, in_flight, int(delayed), int(dead))

    def _dead_entries(self, r: Any, ids: Collection[str] | None) -> list[tuple[Any, DeadLetter]]:
        entries = r.xrange(self._keys.dead, "-", "+")
        out = [(e, entry.dead_letter(e, f)) for e, f in entries if f]
        return [(e, d) for e, d in out if ids is None or d.message.id in ids]

    def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        entries = self._call(lambda r: r.xrange(self._keys.dead, "-", "+", count=limit))
        return [entry.dead_letter(e, f) for e, f in entries if f]

    def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Each back as kew reads it (an entry that was not kew's as what was
        kept of it: its id, or the entry id, the body, the good headers)."""

        def run(r: Any) -> int:
            entries = self._dead_entries(r, ids)
            pipe = r.pipeline(transaction=True)
            for entry_id, d in entries:
                m = d.message
                pipe.xadd(
                    self._keys.stream,
                    {"id": m.id, "body": m.body, "headers": entry.encode_headers(m.headers)},
                )
                pipe.xdel(self._keys.dead, entry_id)
            pipe.execute()
            return len(entries)

        return self._call(run)

    def purge_dead(self, ids: Collection[str] | None = None) -> int:
        def run(r: Any) -> int:
            entries = self._dead_entries(r, ids)
            if entries:
                r.xdel(self._keys.dead, *[e[0] for e in entries])
            return len(entries)

        return self._call(run)

    def purge(self) -> int:
        def run(r: Any) -> int:
            entries = self._undelivered(r, 1_000_000)
            pipe = r.pipeline(transaction=True)
            pipe.zcard(self._keys.delayed)
            pipe.delete(self._keys.delayed)
            if entries:
                pipe.xdel(self._keys.stream, *[e[0] for e in entries])
            return len(entries) + int(pipe.execute()[0])

        return self._call(run)

    def close(self) -> None:
        pass
