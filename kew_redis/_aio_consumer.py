"""The consumer of the Redis provider's native async route
(``RedisAsyncConnector.consumer``): the sync
:class:`~kew_redis.provider.RedisConsumer` on redis.asyncio, with the same
commands in the same order (housekeeping, XAUTOCLAIM, XREADGROUP, the dead
letters of entries kew cannot read).  What is its own:

* **The fetch blocks in XREADGROUP on a client of the consumer's own** (a
  blocked connection cannot be shared; settles take another connection of
  that client), at most until the next housekeeping or delayed message.
* **Acks share round trips** (:class:`~kew_redis._aio_writes.GroupCommit`): the
  XACK + XDEL of every ack that arrived while one was under way go in one
  pipeline; each ``await`` returns once its own is done.
* **Leases are renewed by a task on the loop** (XCLAIM ... JUSTID every
  lease/3), not a thread.  A loop blocked for longer than the lease lets
  the held entries go to another consumer, as a dead process would.
* **A cancelled fetch keeps nothing.**  Nothing is held until a fetch
  returns it; when a fetch is cancelled while its command is under way,
  the reply is lost, and what it delivered is pending under this
  consumer's name yet held by nobody: a sweep (XPENDING of this consumer)
  hands those entries back at once.  Fetches and sweeps take turns (a
  lock), so a sweep never hands back what a fetch is about to return.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.exceptions import RedisClusterException, ResponseError

from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    ConfigError,
    ConsumerFailed,
    Delivery,
    KewError,
    now_ms,
)
from kew_redis import _entries as entry
from kew_redis._aio import RedisAsyncConnector
from kew_redis._aio_client import AsyncClient
from kew_redis._aio_writes import GroupCommit, Item
from kew_redis._reading import GROUP, Housekeeping, buried, bury, pending_counts

__all__ = ["RedisAsyncConsumer"]

log = logging.getLogger("kew.redis")

#: At most this many entries pending under one consumer's name are looked at by a sweep.
SWEEP_MOST = 10_000


class _NoGroup(Exception):
    """The group is gone (another program destroyed it or deleted the stream)."""


class RedisAsyncConsumer:
    def __init__(self, connector: RedisAsyncConnector, queue: str, prefetch: int) -> None:
        self._c = connector
        self._queue = queue
        self._keys = connector.keys(queue)
        self._prefetch = prefetch
        self._lease = connector.options.lease_ms
        self._name = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"
        # A blocking XREADGROUP holds its connection: the consumer has its own client.
        self._client = AsyncClient(connector.client.sync)
        self._held: dict[str, Delivery] = {}  # by entry id: fetched and returned, unsettled
        self._settling: set[str] = set()  # no longer held, their settle under way
        self._room = asyncio.Event()  # set when a settle makes room
        self._reading = asyncio.Lock()  # fetches and sweeps take turns
        self._closed = False
        self._housekeeping = Housekeeping()
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._acks: GroupCommit[str] = GroupCommit(self._flush_acks, f"kew-redis-acks-{queue}")

    async def set_prefetch(self, count: int) -> None:
        """From now on hold at most ``count`` (kew.aio's adaptive window: a
        pull consumer, only the bound its fetches keep to moves; no I/O)."""
        self._prefetch = count
        self._room.set()

    # -- fetching -------------------------------------------------------------

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + timeout
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_leases(), name=f"kew-redis-lease-{self._queue}"
            )
        recreated = False
        while not self._closed:
            self._room.clear()  # a settle from now on ends the wait for room
            room = max(0, min(max_count, self._prefetch - len(self._held)))
            if room <= 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._room.wait()
                continue
            try:
                async with self._reading:
                    try:
                        step = functools.partial(self._next, room=room, deadline=deadline)
                        got = await self._client.call(step)
                    except asyncio.CancelledError:
                        self._sweep_soon()  # the reply is lost: what it delivered goes back
                        raise
            except _NoGroup as e:
                if recreated:
                    raise BrokerUnavailable(f"{self._keys.stream}: {e}") from None
                log.warning("kew: %s; creating the group again", e)
                await self._c.declare(self._queue)
                recreated = True
                continue
            except (AccessRefused, ConfigError) as e:
                raise ConsumerFailed(f"the consumer of {self._queue!r} cannot go on: {e}") from e
            if got or time.monotonic() >= deadline:
                return got
        return []

    async def _next(self, r: Any, room: int, deadline: float) -> list[Delivery]:
        # As RedisConsumer._next: one round trip per fetch while the queue is
        # busy; the mover and the reclaim run every HOUSEKEEPING_MS, and when
        # a known delayed message is due (kew_redis._reading.Housekeeping).
        try:
            now = now_ms()
            chores = self._housekeeping
            if chores.due(now):
                chores.done(now, await self._c.move_due(self._keys, r))
                got = await self._reclaim(r, room)
                if got:
                    return got
            reply = await r.xreadgroup(
                GROUP,
                self._name,
                {self._keys.stream: ">"},
                count=room,
                block=chores.block_ms(now, deadline, self._lease),
            )
            return await self._deliveries(r, reply[0][1]) if reply else []
        except ResponseError as e:
            if "NOGROUP" in str(e):
                raise _NoGroup(str(e)) from None
            raise

    async def _reclaim(self, r: Any, room: int) -> list[Delivery]:
        _, entries, *_ = await r.xautoclaim(
            self._keys.stream, GROUP, self._name, self._lease, "0-0", count=room
        )
        if not entries:
            return []
        pipe = r.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self._keys.stream, GROUP, entry_id, entry_id, 1)
        return await self._deliveries(r, entries, pending_counts(await pipe.execute()))

    async def _deliveries(
        self, r: Any, entries: Any, counts: dict[str, int] | None = None
    ) -> list[Delivery]:
        """The deliveries of the entries read, held from now on; those kew
        cannot read are dead-lettered first, those deleted while pending
        acked, in one MULTI/EXEC (if that fails, none is held: all come
        back after the lease)."""
        out, bad, gone = entry.sort_out(entries, counts)
        if bad or gone:
            pipe = r.pipeline(transaction=True)
            bury(pipe, self._keys.stream, self._keys.dead, bad, gone)
            await pipe.execute()
            buried(self._keys.stream, bad)
        for d in out:
            self._held[cast(str, d.tag)] = d
        return out

    # -- what a cancelled fetch took ---------------------------------------------

    def _sweep_soon(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name=f"kew-redis-sweep-{self._queue}"
            )

    async def _sweep(self) -> None:
        """Hand back what is pending under this consumer's name and neither
        held nor being settled (after the fetch that took it, the lock)."""

        async def run(r: Any) -> None:
            pending = await r.xpending_range(
                self._keys.stream, GROUP, "-", "+", SWEEP_MOST, consumername=self._name
            )
            tags = [entry.text(p["message_id"]) for p in pending]
            await self._hand_back(
                r, [t for t in tags if t not in self._held and t not in self._settling]
            )

        try:
            async with self._reading:
                await self._client.call(run)
        except KewError as e:
            log.warning(
                "kew: handing back what a cancelled fetch of %s took failed (it comes back "
                "when its lease ends): %s",
                self._queue,
                e,
            )

    # -- settling ---------------------------------------------------------------

    def _take(self, delivery: Delivery) -> str | None:
        """The entry id of a delivery still held, no longer held (a fetch
        waiting for room goes on); None if settled already."""
        tag = cast(str, delivery.tag)
        if self._held.pop(tag, None) is None:
            return None
        self._settling.add(tag)
        self._room.set()
        return tag

    async def ack(self, delivery: Delivery) -> None:
        if (tag := self._take(delivery)) is not None:
            try:
                await self._acks.submit(tag)
            finally:
                self._settling.discard(tag)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack ``deliveries`` in one round trip (kew.aio's grouped acks:
        one XACK + XDEL for all); if it fails, none is acked."""
        tags = [tag for d in deliveries if (tag := self._take(d)) is not None]
        if not tags:
            return
        try:
            await self._ack_tags(tags)
        finally:
            self._settling.difference_update(tags)

    async def _ack_tags(self, tags: list[str]) -> None:
        """One XACK and one XDEL for ``tags``, pipelined (no MULTI: the XACK
        settles; the XDEL after it on the same connection only keeps the
        stream short, an acked entry is never delivered again)."""

        async def run(r: Any) -> None:
            pipe = r.pipeline(transaction=False)
            pipe.xack(self._keys.stream, GROUP, *tags)
            pipe.xdel(self._keys.stream, *tags)
            await pipe.execute()

        await self._client.call(run)

    async def _flush_acks(self, items: list[Item[str]]) -> list[Item[str]]:
        try:
            await self._ack_tags([i.value for i in items])
        except KewError as e:
            for i in items:
                i.error = e
        return []

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if (tag := self._take(delivery)) is None:
            return
        fields = entry.dead_fields(delivery.message, delivery.delivery_count, reason)

        async def run(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.xadd(self._keys.dead, fields)
            pipe.xack(self._keys.stream, GROUP, tag)
            pipe.xdel(self._keys.stream, tag)
            await pipe.execute()

        try:
            await self._client.call(run)
        finally:
            self._settling.discard(tag)

    async def release(self, delivery: Delivery) -> None:
        if (tag := self._take(delivery)) is not None:
            try:
                await self._client.call(lambda r: self._hand_back(r, [tag]))
            finally:
                self._settling.discard(tag)

    async def _hand_back(self, r: Any, tags: list[str]) -> None:
        # Make the entries look idle past the lease: the next XAUTOCLAIM takes them.
        if tags:
            await r.xclaim(
                self._keys.stream, GROUP, self._name, 0, tags, idle=self._lease + 1, justid=True
            )

    async def _renew_leases(self) -> None:
        """Reset the idle time of the held entries every lease/3."""
        while not self._closed:
            await asyncio.sleep(self._lease / 3000)
            tags = list(self._held)
            if not tags:
                continue
            try:
                await self._client.get().xclaim(
                    self._keys.stream, GROUP, self._name, 0, tags, justid=True
                )
            except (redis.RedisError, RedisClusterException) as e:  # two more tries in the lease
                log.warning("kew: renewing the leases on %s failed: %s", self._keys.stream, e)

    async def close(self) -> None:
        """Hand back every delivery held (after a fetch or sweep under way)."""
        if self._closed:
            return
        self._closed = True
        self._room.set()
        if self._renewer is not None:
            self._renewer.cancel()
        tasks = [t for t in (self._renewer, self._sweeper) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)  # a sweep under way ends first
        await self._acks.close()
        try:
            async with self._reading:
                tags = list(self._held)
                self._held.clear()
                await self._client.call(lambda r: self._hand_back(r, tags))
        except KewError as e:  # the leases run out instead
            log.warning("kew: handing back the deliveries of %s failed: %s", self._queue, e)
        finally:
            await self._client.close()
