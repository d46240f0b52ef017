"""The STOMP connections of the native async route: frames written by a
writer thread of kew's, RECEIPT frames resolving asyncio futures.

* :class:`AioLink` is the sync route's :class:`~kew_artemis._link._Link`
  (same connecting, failover, heartbeats, frame reader, ERROR handling)
  whose receipts may each belong to an :class:`Entry`: a group of frames
  (one ``send``, one ``send_many``, one ACK) with the future of the
  coroutine that waits for it.  stomp.py's receiver thread, reading the
  last RECEIPT of an entry, resolves its future on the loop.  An ACK has
  no receipt (as in the sync route): its entry is done once written.
* :class:`Wakes` hands resolutions to a loop in batches: one
  ``loop.call_soon_threadsafe`` for every receipt that arrived while the
  loop had not yet run the last one, resolved ``CHUNK`` at a time.
* :class:`Pipe` is the writer thread: coroutines queue entries and await
  their futures; the thread packs the frames of every entry queued (as
  stomp.py would, byte for byte) and writes them in one ``sendall`` per
  connection, opening or reopening its connection first when it writes
  for producers, so that no coroutine ever waits on a socket, a lock of
  stomp.py or a connect.  With ``batch=tx`` (ActiveMQ's default) the
  entries queued while a transaction commits go in the next one, whose
  COMMIT's receipt resolves them all (group commit: one journal sync for
  hundreds of concurrent sends).  A lost connection's entries are written
  again on a new one (at-least-once, three attempts, as the sync
  producer) or, on a consumer's connection, fail with :class:`_Lost`
  (settlements of a lost connection are moot: the broker redelivers).  An
  entry unreceipted after ``receipt_timeout`` drops its connection, as
  the sync wait does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue as queue_mod
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from stomp import utils
from stomp.exception import StompException

from kew.qchan.spi import BrokerUnavailable, KewError, SendError
from kew_artemis._link import _Link, _Lost
from kew_artemis._options import Options

__all__ = ["AioLink", "Entry", "Op", "Pipe", "Wakes"]

#: One frame: ("send", dest, body, headers) or ("ack", ack_id).
Op = tuple[Any, ...]


class Wakes:
    """Resolutions for one event loop, handed over in batches."""

    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wakes] = weakref.WeakKeyDictionary()
    _of_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[None], BaseException | None]] = []
        self._armed = False
        #: How many call_soon_threadsafe wake-ups (for benchmarks).
        self.wakeups = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Wakes:
        with cls._of_lock:
            wakes = cls._of.get(loop)
            if wakes is None:
                wakes = cls._of[loop] = cls(loop)
            return wakes

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the loop, soon (nothing if the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def resolve(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        """From any thread: settle ``future`` on its loop."""
        with self._lock:
            self._items.append((future, error))
            if self._armed:
                return
            self._armed = True
        self.wakeups += 1
        self.call(self._run)

    #: Futures resolved per callback: a group's thousand receipts wake their
    #: coroutines over several turns of the loop, so a timer is never late
    #: by more than a chunk's worth of work.
    CHUNK = 16

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items[: self.CHUNK], self._items[self.CHUNK :]
            if not self._items:
                self._armed = False
            else:
                self.loop.call_soon(self._run)  # the rest after this turn's tasks
        for future, error in items:
            if future.done():  # its coroutine was cancelled
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


@dataclass(eq=False, slots=True)
class Entry:
    """Frames written together, each with a receipt; ``future`` is resolved
    once the broker has receipted them all (or with why not)."""

    ops: list[Op]
    future: asyncio.Future[None] | None  # None: a group, whose members wait
    wakes: Wakes
    label: str = ""
    link: AioLink | None = None  # written on this connection only (a consumer's)
    tx: bool = False  # one transaction, one receipt for its COMMIT
    attempt: int = 0
    left: int = 0
    deadline: float = 0.0
    done: bool = False
    drained: int = 0  # times a lost connection handed it on
    receipts: list[str] = field(default_factory=list)
    #: A group's entries: sends of one turn of the writer, in one transaction.
    members: list[Entry] = field(default_factory=list)

    def settle(self, error: BaseException | None) -> None:
        """Resolve the future (a group: its members'), once."""
        for e in self.members or [self]:
            if e.future is not None and not (e.done and e is not self):
                e.done = True
                e.wakes.resolve(e.future, error)
        self.done = True


class AioLink(_Link):
    """A :class:`_Link` whose receipts may resolve :class:`Entry` futures."""

    def __init__(
        self,
        options: Options,
        url: str,
        on_message: Callable[[_Link, dict[str, str], bytes], None] | None = None,
        on_lost: Callable[[list[Entry]], None] | None = None,
    ) -> None:
        super().__init__(options, url, on_message)
        self.pending: dict[str, Entry] = {}
        #: Called (on the receiver thread) when a transaction is settled or
        #: lost: the writer writes the sends it held meanwhile.
        self.on_settled: Callable[[], None] | None = None
        #: Called with the unfinished entries when the connection is lost
        #: (None: they fail with _Lost).
        self.on_lost = on_lost

    def register(self, entry: Entry, rid: str) -> None:
        """Note that ``entry`` waits for ``rid``; _Lost if the link is lost."""
        with self._cond:
            if self.lost is not None:
                raise _Lost(self.lost)
            self.pending[rid] = entry
            entry.receipts.append(rid)
            entry.left += 1

    def on_receipt(self, frame: Any) -> None:
        rid = frame.headers.get("receipt-id", "")
        with self._cond:
            entry = self.pending.pop(rid, None)
            if entry is None:
                finished = None
            else:
                entry.left -= 1
                finished = entry.left <= 0 and not entry.done
                if finished:
                    entry.done = True
        if entry is None:
            super().on_receipt(frame)
        elif finished:
            entry.settle(None)
            if entry.tx and self.on_settled is not None:
                self.on_settled()

    def on_error(self, frame: Any) -> None:
        rid = frame.headers.get("receipt-id")
        with self._cond:
            entry = self.pending.get(rid or "")
        if entry is None:
            super().on_error(frame)
            if self.lost is not None:
                self._drain()
            return
        message = frame.headers.get("message", "") or str(frame.body or "")[:300]
        with self._cond:
            for r in entry.receipts:
                self.pending.pop(r, None)
            if entry.done:
                return
        entry.settle(SendError(f"the STOMP broker at {self.url} refused a frame: {message}"))
        if entry.tx and self.on_settled is not None:
            self.on_settled()

    def _lose(self, why: str) -> None:
        super()._lose(why)
        self._drain()

    def _drain(self) -> None:
        """The connection is lost: its unfinished entries go to ``on_lost``."""
        with self._cond:
            held = list({id(e): e for e in self.pending.values() if not e.done}.values())
            self.pending.clear()
            entries = []
            for g in held:
                g.done = bool(g.members)  # a group ends; its members go on
                for e in g.members or [g]:
                    if not e.done:
                        e.receipts.clear()
                        e.left = 0
                        e.drained += 1
                        entries.append(e)
            lost = self.lost or "lost"
        if self.on_settled is not None:
            self.on_settled()
        if not entries:
            return
        if self.on_lost is not None:
            self.on_lost(entries)
            return
        for e in entries:
            e.settle(_Lost(lost))

    def pack(self, command: str, headers: dict[str, Any], body: bytes = b"") -> bytes:
        """A frame's bytes, as stomp.py's ``send_frame`` makes them (STOMP
        1.2 header escaping, content-length of a body)."""
        self.check()
        self.conn._escape_headers(headers)
        return cast(bytes, utils.pack(utils.convert_frame(utils.Frame(command, headers, body))))

    def pack_send(self, dest: str, body: bytes, headers: dict[str, Any]) -> bytes:
        """A SEND frame's bytes, as stomp.py's ``Connection12.send``."""
        headers = {**headers, "destination": dest}
        if body and "content-length" not in headers:
            headers["content-length"] = len(body)
        return self.pack("SEND", headers, body)

    def write(self, data: bytes) -> None:
        """Frames packed by :meth:`pack`, in one write; _Lost if it fails."""
        self.check()
        try:
            self.conn.transport.send(data)
        except (StompException, OSError) as e:
            self._lose(repr(e))
            raise _Lost(repr(e)) from None

    def tx_busy(self) -> bool:
        """Whether a transaction of this connection awaits its COMMIT's receipt."""
        with self._cond:
            return any(e.tx and not e.done for e in self.pending.values())

    def overdue(self, now: float) -> bool:
        """Whether an entry waits for a receipt past its deadline."""
        with self._cond:
            return any(e.deadline < now for e in self.pending.values())


_STOP = object()
_WAKE = object()


class Pipe:
    """A writer thread: queued entries written on a connection (see the
    module's docstring).  ``make_link`` opens a new connection for entries
    without a link of their own (a producer's); ``queue`` names them."""

    TICK = 0.25

    def __init__(
        self,
        options: Options,
        url: str,
        name: str,
        make_link: Callable[[], AioLink] | None = None,
        current: Callable[[], AioLink | None] | None = None,
    ) -> None:
        self.options = options
        self.url = url
        self.make_link = make_link
        #: A consumer's live connection, whose receipts are watched too.
        self._current = current
        self._jobs: queue_mod.SimpleQueue[Any] = queue_mod.SimpleQueue()
        self._link: AioLink | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._pid = os.getpid()
        self._start_lock = threading.Lock()
        self._ended = threading.Event()
        self._end_waiters: list[tuple[Wakes, asyncio.Future[None]]] = []
        self._outstanding: set[Entry] = set()
        #: batch=tx sends held while a transaction of their connection
        #: commits: they go in the next one (group commit).
        self._held: list[Entry] = []
        self.writes = 0  # entries written (for benchmarks)

    def _start(self) -> None:
        """Start the writer thread; in a child made by os.fork, a new one
        (the parent's stayed in the parent, its connection is the parent's)."""
        with self._start_lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._jobs = queue_mod.SimpleQueue()
                self._link = None  # the parent's: never written on (reset_in_child)
                self._ended = threading.Event()
                self._started = False
            if not self._started:
                name = self._thread.name
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
                self._started = True

    # -- on the loop ---------------------------------------------------------

    def submit(
        self, ops: list[Op], *, label: str = "", link: AioLink | None = None, tx: bool = False
    ) -> asyncio.Future[None]:
        """Queue ``ops``; the future is resolved once all are receipted."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = Entry(ops, future, Wakes.of(loop), label, link, tx)
        self._outstanding.add(entry)
        future.add_done_callback(lambda _: self._outstanding.discard(entry))
        if not self._started or self._pid != os.getpid():
            self._start()
        self._jobs.put(entry)
        return future

    async def close(self, timeout: float) -> None:
        """Once the entries queued are settled (or after ``timeout``): the
        thread closes its connection and ends."""
        waiting = [f for e in self._outstanding if (f := e.future) is not None and not f.done()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waiting, return_exceptions=True)
        if not self._started:
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        self._end_waiters.append((Wakes.of(loop), ended))
        self._jobs.put(_STOP)
        if self._ended.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(ended)

    # -- on the writer thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=self.TICK)
                except queue_mod.Empty:
                    job = _WAKE
                jobs = [job]
                with contextlib.suppress(queue_mod.Empty):
                    while len(jobs) < 1024:
                        jobs.append(self._jobs.get_nowait())
                self._check_overdue()
                held, self._held = self._held, []
                self._write_all(held + [j for j in jobs if isinstance(j, Entry)])
                if _STOP in jobs:
                    return
        finally:
            link, self._link = self._link, None
            if link is not None:
                link.close()
            self._ended.set()
            for wakes, ended in self._end_waiters:
                wakes.resolve(ended, None)

    def _check_overdue(self) -> None:
        now = time.monotonic()
        for link in (self._link, self._current() if self._current else None):
            if link is not None and link.lost is None and link.overdue(now):
                link._lose("receipt timeout")  # the consumer's thread reconnects
                if link is self._link:
                    link.close()

    def _wake(self) -> None:
        self._jobs.put(_WAKE)

    def _requeue(self, entries: list[Entry]) -> None:
        """``on_lost`` of a producer connection: written again on a new one."""
        for e in entries:
            self._jobs.put(e)

    def _usable(self, entry: Entry) -> AioLink:
        """The connection for a producer's entry: a new one when the last is
        lost, or when it declared a delay queue of these frames so long ago
        that the queue could expire before the message."""
        assert self.make_link is not None
        dests = [op[1] for op in entry.ops if op[0] == "send" and "x-expires" in op[3]]
        link = self._link
        if link is not None and (not link.usable() or link.declares_stale(dests)):
            link.close()
            link = self._link = None
        if link is None:
            link = self.make_link()
            link.on_lost = self._requeue
            link.open()
            self._link = link
            link.declares_stale(dests)
        return link

    def _fail(self, entry: Entry, error: BaseException) -> None:
        if not entry.done:
            entry.settle(error)

    def _write_all(self, entries: list[Entry]) -> None:
        """Encode every entry's frames (receipts noted), then write them
        with one ``sendall`` per connection: a turn of the loop's sends are
        one write, not one system call (and one GIL hand-off) a frame."""
        out: dict[int, tuple[AioLink, list[bytes]]] = {}
        txs: dict[int, list[Entry]] = {}
        busy: dict[int, bool] = {}
        written: dict[int, list[Entry]] = {}  # entries without a receipt: done once written
        for entry in entries:
            link = self._link_for(entry)
            if link is None:
                continue
            chunks = out.setdefault(id(link), (link, []))[1]
            if entry.tx:  # batch=tx: one transaction for the turn's frames of a connection
                link.on_settled = self._wake
                if busy.setdefault(id(link), link.tx_busy()):  # one committing at a time
                    if entry.link is None:
                        entry.attempt -= 1  # not an attempt: held
                    self._held.append(entry)
                    continue
                txs.setdefault(id(link), []).append(entry)
                continue
            drained = entry.drained
            try:
                self._encode(link, entry, chunks)
            except _Lost as e:
                self._lost_before_write(entry, drained, e)
                continue
            if not entry.receipts:
                written.setdefault(id(link), []).append(entry)
        for key, members in txs.items():
            link, chunks = out[key]
            written.setdefault(key, []).extend(self._encode_tx(link, members, chunks))
        for key, (link, chunks) in out.items():
            error: _Lost | None = None
            if chunks:
                try:
                    link.write(b"".join(chunks))
                except _Lost as e:  # the receipted entries are handed on by _drain
                    error = e
            for entry in written.get(key, ()):
                if not entry.done:
                    entry.settle(error)

    def _link_for(self, entry: Entry) -> AioLink | None:
        """The connection to write ``entry`` on (None: it is settled)."""
        if entry.done or entry.future is None or entry.future.cancelled():
            return None
        self.writes += 1
        if entry.link is not None:  # a consumer's connection: that one or none
            return entry.link
        entry.attempt += 1
        if entry.attempt > 3:
            why = f"sending to {entry.label} at {self.url} failed: lost 3 times"
            self._fail(entry, BrokerUnavailable(why))
            return None
        try:
            return self._usable(entry)
        except KewError as e:  # BrokerUnavailable after the retries, AccessRefused at once
            self._fail(entry, e)
        except Exception as e:
            self._fail(entry, BrokerUnavailable(f"sending to {entry.label} at {self.url}: {e!r}"))
        return None

    def _lost_before_write(self, entry: Entry, drained: int, e: _Lost) -> None:
        if entry.link is not None:
            self._fail(entry, e)
        elif entry.drained == drained:  # no receipt of it was noted: not requeued
            self._jobs.put(entry)

    def _encode_tx(self, link: AioLink, members: list[Entry], out: list[bytes]) -> list[Entry]:
        """Every SEND of ``members`` in one transaction, whose COMMIT's
        receipt resolves them all: ActiveMQ syncs its journal once per
        COMMIT, but once per plain SEND, one at a time on a connection."""
        if len(members) == 1:
            group = members[0]
        else:
            group = Entry([op for m in members for op in m.ops], None, members[0].wakes)
            group.link, group.tx = members[0].link, True
            group.members = members
        drained = [m.drained for m in members]
        try:
            self._encode(link, group, out, tx=True)
        except _Lost as e:
            for m, d in zip(members, drained, strict=True):
                self._lost_before_write(m, d, e)
            return []
        return [] if group.receipts else members  # one ACK: done once written

    def _encode(self, link: AioLink, entry: Entry, out: list[bytes], tx: bool = False) -> None:
        entry.deadline = time.monotonic() + self.options.receipt_timeout
        if (tx or entry.tx) and len(entry.ops) > 1:
            txid = link.new_receipt()
            out.append(link.pack("BEGIN", {"transaction": txid}))
            for op in entry.ops:
                if op[0] == "send":
                    out.append(link.pack_send(op[1], op[2], {**op[3], "transaction": txid}))
                else:
                    out.append(link.pack("ACK", {"id": op[1], "transaction": txid}))
            rid = link.new_receipt()
            link.register(entry, rid)
            out.append(link.pack("COMMIT", {"transaction": txid, "receipt": rid}))
            return
        for op in entry.ops:
            if op[0] == "ack":  # no receipt: settled once written (see written)
                out.append(link.pack("ACK", {"id": op[1]}))
                continue
            rid = link.new_receipt()
            link.register(entry, rid)
            out.append(link.pack_send(op[1], op[2], {**op[3], "receipt": rid}))
