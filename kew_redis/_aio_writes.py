"""The writes of the Redis provider's native async route: sends in shared
round trips.

* :class:`GroupCommit`: whatever is submitted while a flush is under way
  goes in the next flush, together; each submitter's await returns once
  its own item is done.
* :func:`write_parts`: the packed commands of many sends (:class:`Part`,
  packed by :func:`pack`, a step at a time) without MULTI, in one
  round trip per master (side by side on Cluster), each master's share
  followed by ``WAIT`` on its connection with ``min_replicas``, as
  :mod:`kew_redis._writes` does for the sync provider; what failed of each
  part (an error reply fails only its own).  The replies are read a step
  at a time, so timers fire between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)

from kew.qchan.spi.kit import Backoff
from kew_redis._client import NotReplicated
from kew_redis._options import Options

__all__ = [
    "ADD_ALL",
    "Batch",
    "Failure",
    "GroupCommit",
    "Item",
    "Part",
    "pack",
    "write_parts",
]

T = TypeVar("T")

#: What redis-py raises: an error reply, a lost connection, Cluster routing.
Failure = redis.RedisError | RedisClusterException

#: Futures resolved per turn of the loop: the coroutines they wake run in the
#: next turn, and timers fire between turns.
RESOLVE_EACH = 64


class Item(Generic[T]):
    """One submitter's share of a flush: its value and its future."""

    __slots__ = ("attempts", "error", "future", "started", "value")

    def __init__(self, value: T, future: asyncio.Future[None]) -> None:
        self.value = value
        self.future = future
        self.attempts = 0
        self.started = time.monotonic()
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Group commit on the event loop: whatever is submitted while a flush
    is under way goes in the next flush, together, and each submitter's
    await returns once its own item is done.

    ``flush(items)`` does the round trip, sets ``error`` on the items that
    failed for good and returns those to try again: they go first in the
    next flush (after a back-off), with what arrived meanwhile.  An item
    whose submitter was cancelled before its flush is left out."""

    def __init__(
        self, flush: Callable[[list[Item[T]]], Awaitable[list[Item[T]]]], name: str
    ) -> None:
        self._flush = flush
        self._name = name
        self._pending: list[Item[T]] = []
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        #: Flushes so far (each one round trip per master).
        self.flushes = 0

    def submit(self, value: T) -> asyncio.Future[None]:
        """Add ``value`` to the next flush; await the future it returns (a
        plain future, not a coroutine: one frame less to resume per send)."""
        loop = asyncio.get_running_loop()
        item = Item(value, loop.create_future())
        self._pending.append(item)
        if self._task is None or self._task.done():
            # it runs at the next turn: what is submitted in this one joins
            self._task = loop.create_task(self._run(), name=self._name)
        return item.future

    async def _run(self) -> None:
        batch: list[Item[T]] = []
        try:
            while self._pending:
                batch = [i for i in self._pending if not i.future.done()]
                self._pending = []
                if not batch:
                    continue
                self.flushes += 1
                again = set(await self._flush(batch))
                await self._resolve([i for i in batch if i not in again])
                if again:
                    self._pending[:0] = [i for i in batch if i in again]
                    await asyncio.sleep(self._backoff.delay())
                else:
                    self._backoff.reset()
                batch = []
        except BaseException as e:  # cancelled with its loop, or a bug: nobody is left waiting
            for i in [*batch, *self._pending]:
                if not i.future.done():
                    if isinstance(e, asyncio.CancelledError):
                        i.future.cancel()
                    else:
                        i.future.set_exception(e)
            self._pending = []
            if not isinstance(e, Exception):
                raise

    async def _resolve(self, items: list[Item[T]]) -> None:
        for n, i in enumerate(items, 1):
            if not i.future.done():
                if i.error is None:
                    i.future.set_result(None)
                else:
                    i.future.set_exception(i.error)
            if n % RESOLVE_EACH == 0 and n < len(items):
                await asyncio.sleep(0)

    async def close(self) -> None:
        """After the flushes already asked for."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])


#: Replies read per turn of the loop.
STEP = 64


class Part(NamedTuple):
    """A share of a flush: the commands of a send (to one slot), packed
    in RESP."""

    key: str  # names the slot
    packed: bytes
    commands: int

    @classmethod
    def of(cls, key: str, commands: Sequence[tuple[Any, ...]]) -> Part:
        return cls(key, b"".join(pack(c) for c in commands), len(commands))


def pack(args: tuple[Any, ...]) -> bytes:
    """A command in RESP, its arguments encoded as redis-py's ``Encoder``
    does (str as UTF-8, int and float by ``repr``, bytes as they are)."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        if a.__class__ is not bytes:  # (exact classes first: this runs for every send)
            a = a.encode() if a.__class__ is str else _encoded(a)
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


#: The XADDs of many messages to one stream (KEYS[1]) in one command:
#: ARGV is id, body, headers of each in turn.  An error (e.g. WRONGTYPE,
#: OOM, READONLY: at the first XADD) fails all of them.
ADD_ALL = b"""
for i = 1, #ARGV, 3 do
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'body', ARGV[i + 1], 'headers', ARGV[i + 2])
end
return #ARGV / 3
"""
#: Messages (and bytes) of one :class:`Batch` at most: a script blocks the server while it runs.
BATCH_MOST = 1000
BATCH_BYTES = 1 << 20


class Batch:
    """Messages to one stream, added by one ``EVAL`` of :data:`ADD_ALL`
    (one command to pack, send and read instead of one per message)."""

    __slots__ = ("at", "count", "key", "pieces", "size")

    def __init__(self, key: str) -> None:
        self.key = key
        self.pieces: list[bytes] = []
        self.count = 0
        self.size = 0
        self.at = -1  # the index of its part in the flush

    @property
    def full(self) -> bool:
        return self.count >= BATCH_MOST or self.size >= BATCH_BYTES

    def add(self, message_id: str, body: bytes, headers: bytes) -> None:
        mid = message_id.encode()
        piece = b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(mid),
            mid,
            len(body),
            body,
            len(headers),
            headers,
        )
        self.pieces.append(piece)
        self.count += 1
        self.size += len(piece)

    def part(self) -> Part:
        """The ``EVAL`` in RESP, as :func:`pack` packs it."""
        key = self.key.encode()
        head = b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n$%d\r\n%s\r\n" % (
            4 + 3 * self.count,
            len(ADD_ALL),
            ADD_ALL,
            len(key),
            key,
        )
        return Part(self.key, head + b"".join(self.pieces), 1)


def _encoded(a: object) -> bytes:
    if isinstance(a, bytes):
        return bytes(a)
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, int | float) and not isinstance(a, bool):
        return repr(a).encode()
    if isinstance(a, memoryview):
        return a.tobytes()
    raise redis.DataError(f"cannot send {type(a).__name__} to Redis: {a!r}")


async def write_parts(r: Any, options: Options, parts: Sequence[Part]) -> list[Failure | None]:
    """Run the commands of ``parts`` without MULTI, in one round trip per
    master (side by side on Cluster), each master's share followed by
    ``WAIT`` on its connection with ``min_replicas``.  Returns what failed
    of each part: None, an error reply, or its connection's error (or
    :class:`NotReplicated`).  A write lost with its connection may or may
    not be stored, as in the sync provider."""
    from redis.asyncio.cluster import RedisCluster

    if not isinstance(r, RedisCluster):
        pool = r.connection_pool
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            conn = await pool.get_connection("XADD")
        try:
            where = options.path or f"{options.host}:{options.port}"
            return await _exchange(conn, options, parts, where)
        finally:  # (a connection whose read failed was disconnected by redis-py)
            await pool.release(conn)
    cluster: Any = r  # (redis-py's annotations: a node may be None)
    try:
        await cluster.initialize()
        masters: dict[str, tuple[Any, list[int]]] = {}
        for n, part in enumerate(parts):
            node = cluster.get_node_from_key(part.key)
            masters.setdefault(node.name, (node, []))[1].append(n)
    except SlotNotCoveredError:
        await _reread_layout(cluster)
        raise
    results = await asyncio.gather(
        *(_on_node(node, options, [parts[n] for n in ns]) for node, ns in masters.values()),
        return_exceptions=True,
    )
    out: list[Failure | None] = [None] * len(parts)
    for (_, ns), result in zip(masters.values(), results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, Failure):
            raise result
        failures = [result] * len(ns) if isinstance(result, Failure) else result
        for n, failed in zip(ns, failures, strict=True):
            out[n] = failed
    if any(isinstance(e, _REREAD) for e in out):
        await _reread_layout(cluster)  # a lost master, a moved slot: as redis-py does
    return out


#: After these, the cluster's layout is read again (kew_redis._writes does the same).
_REREAD = redis.ConnectionError | redis.TimeoutError | AskError | ClusterDownError


async def _reread_layout(r: Any) -> None:
    with contextlib.suppress(redis.RedisError, RedisClusterException):
        await r.nodes_manager.initialize()


async def _on_node(node: Any, options: Options, parts: list[Part]) -> list[Failure | None]:
    conn = node.acquire_connection()
    try:
        return await _exchange(conn, options, parts, node.name)
    finally:
        node.release(conn)


async def _exchange(
    conn: Any, options: Options, parts: Sequence[Part], where: str
) -> list[Failure | None]:
    """One round trip on ``conn``: the commands of ``parts`` (and WAIT);
    what failed of each part.  The replies are read ``STEP`` at a time,
    each step a turn of the loop (timers fire between) within
    ``socket_timeout``."""
    n = options.min_replicas
    sent = [p.packed for p in parts]
    if n:
        sent.append(pack(("WAIT", n, options.replica_timeout_ms)))
    await conn.send_packed_command(sent)
    owner = [i for i, p in enumerate(parts) for _ in range(p.commands)]  # of each reply
    out: list[Failure | None] = [None] * len(parts)
    for at in range(0, len(owner), STEP):
        if at:
            await asyncio.sleep(0)
        try:
            async with asyncio.timeout(options.socket_timeout):
                for i in owner[at : at + STEP]:
                    try:
                        await conn.read_response(timeout=math.inf)
                    except ResponseError as e:  # an error reply: the connection stays in step
                        out[i] = out[i] or e
        except TimeoutError:  # (the cancelled read disconnected the connection)
            raise redis.TimeoutError(f"Timeout reading from {where}") from None
    if n:
        acked = await _read_wait(conn, options, where)
        if acked is not None:
            out = [failed or acked for failed in out]
    return out


async def _read_wait(conn: Any, options: Options, where: str) -> Failure | None:
    """The WAIT reply (it may take ``replica_timeout``): None if enough
    replicas confirmed, else the error of every write of the connection."""
    n = options.min_replicas
    seconds = options.replica_timeout_ms / 1000
    try:
        async with asyncio.timeout(options.socket_timeout + seconds):
            acked = await conn.read_response(timeout=math.inf)
    except ResponseError as e:
        return e
    except TimeoutError:  # (the cancelled read disconnected the connection)
        raise redis.TimeoutError(f"no answer to WAIT from {where}") from None
    if int(acked) >= n:
        return None
    return NotReplicated.of(where, int(acked), n, options.replica_timeout_ms)
