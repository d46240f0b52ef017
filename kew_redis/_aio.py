"""The Redis provider's native async route: ``RedisConnector.aio()``, which
:func:`kew.aio.connect` takes.  redis.asyncio (its ``RedisCluster`` on Redis
Cluster): no thread, every round trip awaited on the event loop.

The keys, entries, Lua script, dead-letter reasons and errors are the sync
provider's (:mod:`kew_redis.provider`, :mod:`kew_redis._entries`), whose pure
parts are used here, so a message sent by one route is consumed by the
other.  This module: the connector, the producer, the browser.

* **Sends share round trips** (:mod:`kew_redis._aio_writes`): the sends of
  every producer of a connector (and ``send_to``) that arrive on a loop
  while a round trip is under way go together in the next one: one
  pipeline without MULTI (on Cluster, one per master, side by side),
  followed on the same connection by ``WAIT`` with ``min_replicas``.  In
  it, the messages to one stream are added by one ``EVAL`` (a Lua loop of
  XADDs, up to 1,000 messages or 1 MiB a script: one command to pack,
  run and answer instead of one a message, the entries as the sync
  provider writes them); a delayed message is a ZADD of its own.  Each
  ``await`` returns once its own messages are stored (and confirmed by the
  replicas).  An error reply fails only the sends it belongs to (those of
  its script: one stream's); after a lost connection or a moved slot, the
  sends not yet stored go again (``retries``), with those that arrived
  meanwhile.  A server that refuses scripts to the user (an ACL without
  ``@scripting``) gets one XADD a message from then on.
* Every other call goes through :class:`~kew_redis._aio_client.AsyncClient`:
  retried and translated into kew's errors as the sync provider's.
* The consumer: :mod:`kew_redis._aio_consumer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import NoPermissionError, RedisClusterException, ResponseError

from kew.qchan.spi import (
    Capability,
    DeadLetter,
    KewError,
    Message,
    QueueStats,
    SendError,
    now_ms,
)
from kew.qchan.spi.wire import Malformed
from kew_redis import _entries as entry
from kew_redis._aio_client import AsyncClient, PerLoop
from kew_redis._aio_writes import STEP, Batch, GroupCommit, Item, Part, write_parts
from kew_redis._client import aio_script
from kew_redis._reading import GROUP
from kew_redis._writes import Recorder
from kew_redis.provider import RedisConnector, _add, _check_size, _Keys

if TYPE_CHECKING:
    from kew_redis._aio_consumer import RedisAsyncConsumer

__all__ = ["RedisAsyncBrowser", "RedisAsyncConnector", "RedisAsyncProducer"]

log = logging.getLogger("kew.redis")

#: What a send submits to the group commit: its messages, with their queues.
Sends = Sequence[tuple[str, Message]]

# -- connector -----------------------------------------------------------------------


class RedisAsyncConnector:
    """``RedisConnector.aio()``: the same Redis, awaited; takes the sync
    connector over (``close()`` closes it)."""

    def __init__(self, sync: RedisConnector) -> None:
        self.sync = sync
        self.url = sync.url
        self.max_message_size = sync.max_message_size
        self.lacks: Mapping[Capability, str] = sync.lacks
        self.options = sync.options
        #: Sends, browsing, declares (each consumer has a client of its own).
        self.client = AsyncClient(sync.client)
        self._sends: PerLoop[GroupCommit[Sends]] = PerLoop(
            lambda: GroupCommit(self._write, "kew-redis-sends")
        )
        self._keys: dict[str, _Keys] = {}  # by queue, for the flushes
        #: Sends to a stream go in one EVAL (until the server refuses scripts).
        self._scripts = True
        self._move_due = aio_script(entry.MOVE_DUE)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisAsyncConnector({self.url!r})"

    @property
    def sends(self) -> GroupCommit[Sends]:
        """The sends of every producer of this connector on the running
        loop, in shared round trips."""
        return self._sends.get()

    def keys(self, queue: str) -> _Keys:
        return self.sync.keys(queue)

    async def move_due(self, keys: _Keys, r: Any) -> int | None:
        """Move due delayed messages into the stream; the next due time."""
        return entry.due(
            await self._move_due(
                keys=[keys.delayed, keys.stream, keys.dead],
                args=[now_ms(), entry.BAD_DELAYED],
                client=r,
            )
        )

    async def declare(self, queue: str) -> None:
        stream = self.keys(queue).stream

        async def create(r: Any) -> None:
            try:
                await r.xgroup_create(stream, GROUP, "0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        await self.client.call(create)

    async def producer(self, queue: str) -> RedisAsyncProducer:
        return RedisAsyncProducer(self, queue)

    async def consumer(self, queue: str, prefetch: int) -> RedisAsyncConsumer:
        from kew_redis._aio_consumer import RedisAsyncConsumer  # (it imports this module)

        await self.declare(queue)
        return RedisAsyncConsumer(self, queue, prefetch)

    async def browser(self, queue: str) -> RedisAsyncBrowser:
        return RedisAsyncBrowser(self, queue)

    async def delete(self, queue: str) -> None:
        k = self.keys(queue)
        await self.client.call(lambda r: r.delete(k.stream, k.dead, k.delayed))

    async def send_to(self, sends: Sequence[tuple[str, Message]]) -> None:
        """``AsyncMultiSender``: every message checked first (size), then
        stored in the next shared round trip (no MULTI: as ``send_many``,
        on error any of them may or may not be stored)."""
        for queue, m in sends:
            _check_size(self.sync, queue, m)
        if sends:
            await self.sends.submit(sends)

    async def _write(self, items: list[Item[Sends]]) -> list[Item[Sends]]:
        """A flush of :attr:`sends`, in one round trip: the messages to each
        stream in one ``EVAL`` of :data:`~kew_redis._aio_writes.ADD_ALL`
        (a :class:`~kew_redis._aio_writes.Batch`; without scripts, refused
        by the server's ACL, one XADD each), delayed ones a ZADD each (the
        sync provider's ``_add``), packed here ``STEP`` messages a turn of
        the loop; the items to send again."""
        parts: list[Part] = []
        batches: dict[str, Batch] = {}  # the open one of each stream
        owners: list[Batch | int] = []  # of each message: its batch, or its part
        keys_of = self._keys
        n = 0
        for i in items:
            for queue, m in i.value:
                n += 1
                if n % STEP == 0:
                    await asyncio.sleep(0)
                keys = keys_of.get(queue) or keys_of.setdefault(queue, self.keys(queue))
                if self._scripts and m.body.__class__ is bytes and not _delayed(m):
                    batch = batches.get(keys.stream)
                    if batch is None or batch.full:
                        batch = batches[keys.stream] = Batch(keys.stream)
                    batch.add(m.id, m.body, entry.encode_headers(m.headers))  # (sizes checked)
                    owners.append(batch)
                    continue
                rec = Recorder()
                _add(self.sync, rec, keys, queue, m)
                owners.append(len(parts))
                parts.append(Part.of(keys.stream, rec.commands))
        for owner in owners:
            if isinstance(owner, Batch) and owner.at < 0:
                owner.at = len(parts)
                parts.append(owner.part())
        try:
            failures = await write_parts(self.client.get(), self.options, parts)
        except (redis.RedisError, RedisClusterException) as e:
            failures = [e] * len(parts)
        except KewError as e:  # the client cannot be made (ConfigError)
            for i in items:
                i.error = e
            return []
        scripted = self._scripts
        if scripted and any(e is not None and _no_scripts(e) for e in failures):
            log.warning("kew: Redis at %s refuses scripts: an XADD a message from now", self.url)
            self._scripts = False
        again: list[Item[Sends]] = []
        mine = iter(owners)
        for i in items:
            failed = None
            for _ in i.value:
                owner = next(mine)
                failed = failed or failures[owner.at if isinstance(owner, Batch) else owner]
            if failed is None:
                i.attempts += 1
                continue
            if scripted and _no_scripts(failed):
                again.append(i)  # (not an attempt: the scripts, not the sends, were refused)
                continue
            i.attempts += 1
            final = self.client.sync.translate(failed, SendError)
            if final is None and i.attempts <= self.options.retries:
                again.append(i)
                continue
            i.error = final or self.client.unreachable(failed, i.attempts, i.started)
            i.error.__cause__ = failed
        return again

    async def close(self) -> None:
        """After the sends already asked for: the clients and the sync
        connector are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            for loop, group in self._sends.take():
                if loop is asyncio.get_running_loop():
                    await group.close()
            await self.client.close()
        finally:
            self.sync.close()


def _delayed(m: Message) -> bool:
    """Whether ``_add`` stores ``m`` in the delayed set (a ZADD)."""
    return m.deliver_at is not None and m.deliver_at > now_ms()


def _no_scripts(e: BaseException) -> bool:
    """Whether an error reply to an ``EVAL`` says the server runs no
    scripts for this user (an ACL without ``@scripting``, a proxy)."""
    text = str(e).lower()
    return "'eval'" in text and (isinstance(e, NoPermissionError) or "unknown command" in text)


# -- producer --------------------------------------------------------------------------


class RedisAsyncProducer:
    def __init__(self, connector: RedisAsyncConnector, queue: str) -> None:
        self._c = connector
        self._queue = queue
        self._keys = connector.keys(queue)

    async def send(self, message: Message) -> None:
        _check_size(self._c.sync, self._queue, message)
        await self._c.sends.submit(((self._queue, message),))

    async def send_many(self, messages: Sequence[Message]) -> None:
        for m in messages:  # MessageTooLarge before anything is sent
            _check_size(self._c.sync, self._queue, m)
        if messages:
            await self._c.sends.submit([(self._queue, m) for m in messages])

    async def close(self) -> None:
        pass


# -- browser ---------------------------------------------------------------------------


class RedisAsyncBrowser:
    """The sync browser's reads and writes (kew_redis.provider.RedisBrowser), awaited."""

    def __init__(self, connector: RedisAsyncConnector, queue: str) -> None:
        self._c = connector
        self._call = connector.client.call
        self._keys = connector.keys(queue)

    async def _undelivered(self, r: Any, limit: int) -> list[Any]:
        try:
            groups = await r.xinfo_groups(self._keys.stream)
        except ResponseError as e:
            if "no such key" in str(e).lower():
                return []  # not declared, or deleted
            raise
        last = next(
            (entry.text(g["last-delivered-id"]) for g in groups if entry.text(g["name"]) == GROUP),
            "0-0",
        )
        return cast(list[Any], await r.xrange(self._keys.stream, f"({last}", "+", count=limit))

    async def peek(self, limit: int) -> Sequence[Message]:
        """Entries a consumer will dead-letter are shown as they will be kept."""
        await self._call(lambda r: self._c.move_due(self._keys, r))
        out = []
        for entry_id, f in await self._call(lambda r: self._undelivered(r, limit)):
            try:
                out.append(entry.message(f))
            except Malformed:
                out.append(entry.salvaged(entry.text(entry_id), f))
        return out

    async def stats(self) -> QueueStats:
        k = self._keys

        async def run(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.xlen(k.stream)
            pipe.xpending(k.stream, GROUP)
            pipe.zcard(k.delayed)
            pipe.xlen(k.dead)
            replies = cast(list[Any], await pipe.execute(raise_on_error=False))
            for i in (0, 2, 3):
                if isinstance(replies[i], Exception):
                    raise replies[i]
            pending = replies[1]
            if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
                replies[1] = {"pending": 0}  # the group is gone: its consumers create it again
            elif isinstance(pending, Exception):
                raise pending
            return replies

        length, pending, delayed, dead = await self._call(run)
        in_flight = int(pending["pending"])
        return QueueStats(int(length) - in_flight, in_flight, int(delayed), int(dead))

    async def _dead_entries(
        self, r: Any, ids: Collection[str] | None
    ) -> list[tuple[Any, DeadLetter]]:
        entries = await r.xrange(self._keys.dead, "-", "+")
        out = [(e, entry.dead_letter(e, f)) for e, f in entries if f]
        return [(e, d) for e, d in out if ids is None or d.message.id in ids]

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        entries = await self._call(lambda r: r.xrange(self._keys.dead, "-", "+", count=limit))
        return [entry.dead_letter(e, f) for e, f in entries if f]

    async def requeue_dead(self, ids: Collection[str] | None = None) -> int:
        """Each back as kew reads it (as the sync browser does)."""

        async def run(r: Any) -> int:
            entries = await self._dead_entries(r, ids)
            pipe = r.pipeline(transaction=True)
            for entry_id, d in entries:
                m = d.message
                pipe.xadd(
                    self._keys.stream,
                    {"id": m.id, "body": m.body, "headers": entry.encode_headers(m.headers)},
                )
                pipe.xdel(self._keys.dead, entry_id)
            if entries:
                await pipe.execute()
            return len(entries)

        return await self._call(run)

    async def purge_dead(self, ids: Collection[str] | None = None) -> int:
        async def run(r: Any) -> int:
            entries = await self._dead_entries(r, ids)
            if entries:
                await r.xdel(self._keys.dead, *[e[0] for e in entries])
            return len(entries)

        return await self._call(run)

    async def purge(self) -> int:
        async def run(r: Any) -> int:
            entries = await self._undelivered(r, 1_000_000)
            pipe = r.pipeline(transaction=True)
            pipe.zcard(self._keys.delayed)
            pipe.delete(self._keys.delayed)
            if entries:
                pipe.xdel(self._keys.stream, *[e[0] for e in entries])
            return len(entries) + int((await pipe.execute())[0])

        return await self._call(run)

    async def close(self) -> None:
        pass
