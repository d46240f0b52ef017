"""GroupCommit, AsyncGroupCommit and LoopGroupCommit (one commit under way,
the rest batched), and the task layer's packing of status events into one
message."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kew.qchan._commit import LoopGroupCommit
from kew.qchan.runtime import AsyncGroupCommit, GroupCommit
from kew.qchan.spi import Message, now_ms
from kew.task import App, SqliteTaskStore, TaskEvent
from kew.task._events import PACK_BYTES
from kew.testing.util import wait_for


def test_one_commit_at_a_time_and_the_rest_batched() -> None:
    """Commits block until released: one runs, the other callers join the
    next batch, and every payload is committed exactly once."""
    lock = threading.Lock()
    running: list[list[int]] = []
    batches: list[list[int]] = []
    most = [0]
    release = threading.Event()

    def commit(batch: list[int]) -> None:
        with lock:
            running.append(batch)
            most[0] = max(most[0], len(running))
        release.wait(10)
        with lock:
            running.remove(batch)
            batches.append(batch)

    group: GroupCommit[int] = GroupCommit(commit)
    first = threading.Thread(target=group.submit, args=(0,))
    first.start()
    wait_for(lambda: running == [[0]], 10, what="the first commit under way")
    threads = [threading.Thread(target=group.submit, args=(i,)) for i in range(1, 8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(group._later) == 7, 10, what="the others queued")
    release.set()
    for t in [first, *threads]:
        t.join(10)
    assert batches[0] == [0]
    assert sorted(batches[1]) == list(range(1, 8))  # one batch for all who waited
    assert most[0] == 1


def test_a_failed_commit_reaches_every_caller_of_its_batch() -> None:
    def commit(batch: list[int]) -> None:
        raise OSError(f"disk full for {batch}")

    group: GroupCommit[int] = GroupCommit(commit)
    with pytest.raises(OSError, match=r"disk full for \[5\]"):
        group.submit(5)


def _events(app: App, n: int, start: int = 0) -> list[TaskEvent]:
    # (recent: a recorder prunes final tasks past its retention)
    now = now_ms()
    return [TaskEvent(f"t{i}", "q", "succeeded", now + i, attempt=1) for i in range(start, n)]


def test_event_messages_of_a_batch_are_packed_into_one(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path}/q.sqlite3", store=SqliteTaskStore(tmp_path / "t.sqlite3"))
    try:
        name = app.events.name
        per_attempt = [app.events._message(_events(app, 2 * i + 2, 2 * i)) for i in range(3)]
        single = app.events._message(_events(app, 7, 6)[0])  # an old-style single event
        other = Message("x", b"[1]")
        assert app.emitter.pack("other.queue", [other, other]) == [other, other]
        packed = app.emitter.pack(name, [*per_attempt, single])
        assert len(packed) == 1
        decoded = msgspec.json.decode(packed[0].body, type=list[TaskEvent])
        assert [e.task_id for e in decoded] == [f"t{i}" for i in range(7)]
        assert packed[0].headers == per_attempt[0].headers | {"kew-sent-at": ANY_INT}
        # large output splits the pack below PACK_BYTES a message
        big = [
            app.events._message([TaskEvent(f"b{i}", "q", "output", 1, text="x" * 100_000)])
            for i in range(6)
        ]
        parts = app.emitter.pack(name, big)
        assert 1 < len(parts) < 6
        assert all(len(p.body) <= PACK_BYTES for p in parts)
        ids = [e.task_id for p in parts for e in msgspec.json.decode(p.body, type=list[TaskEvent])]
        assert ids == [f"b{i}" for i in range(6)]
    finally:
        app.close()


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)


ANY_INT = _AnyInt()


def test_recorder_applies_single_events_and_packed_lists(tmp_path: Path) -> None:
    """The events queue's wire format: a TaskEvent, or a JSON array of them
    (what workers send); a recorder applies both, and dead-letters a body
    that is neither."""
    app = App(f"sqlite:///{tmp_path}/q.sqlite3", store=SqliteTaskStore(tmp_path / "t.sqlite3"))
    try:
        app.events.send(TaskEvent("one", "q", "queued", 1000))
        queued = [TaskEvent(f"t{i}", "q", "queued", now_ms() - 10) for i in range(3)]
        app.events.send([TaskEvent("two", "q", "queued", 1000), *queued, *_events(app, 3)])
        app.events._producer.send(Message("bad", b'{"not": "an event"}'))
        with app.recorder():
            wait_for(lambda: app.status("t2") is not None, 10, what="the packed events")
            wait_for(lambda: app.events.dead.list(), 10, what="the bad body dead-lettered")
        assert [app.status(t).status for t in ("one", "two", "t0", "t1", "t2")] == [  # type: ignore[union-attr]
            "queued",
            "queued",
            "succeeded",
            "succeeded",
            "succeeded",
        ]
        (dead,) = app.events.dead.list()
        assert dead.id == "bad" and "cannot decode as TaskEvent" in dead.reason
    finally:
        app.close()


def test_async_batches_and_the_finisher_starts_the_next() -> None:
    """AsyncGroupCommit: a commit finishes by callback (here, from the test
    thread, as a broker's I/O thread would); callers arriving meanwhile wait,
    and finishing the commit starts one for all of them."""
    under_way: list[tuple[list[int], Any]] = []
    group: AsyncGroupCommit[int] = AsyncGroupCommit(
        lambda batch, done: under_way.append((batch, done))
    )
    results: dict[int, BaseException | None] = {}

    def record(i: int) -> Any:
        return lambda error: results.__setitem__(i, error)

    for i in range(6):
        group.submit_later(i, record(i))
    assert [b for b, _ in under_way] == [[0]]  # 1..5 wait for it
    under_way.pop(0)[1](None)  # finishing [0] starts [1, 2, 3, 4, 5] at once
    assert results == {0: None}
    assert [b for b, _ in under_way] == [[1, 2, 3, 4, 5]]
    error = OSError("lost")
    under_way.pop(0)[1](error)
    assert results == {0: None, 1: error, 2: error, 3: error, 4: error, 5: error}
    group.submit_later(6, record(6))  # nothing under way now: committed at once
    assert [b for b, _ in under_way] == [[6]]


def test_async_commit_finishing_at_once_does_not_nest() -> None:
    """A commit that calls back before it returns (nothing to wait for)
    while callers keep arriving: the next batches run in a loop, not
    nested calls, so the stack stays flat however many there are."""
    depth: list[int] = []
    group: AsyncGroupCommit[int] = AsyncGroupCommit(lambda b, done: None)  # replaced below
    arrivals = iter(range(1, 600))

    def commit(batch: list[int], done: Any) -> None:
        depth.append(len(inspect.stack(0)))
        nxt = next(arrivals, None)
        if nxt is not None:  # another caller arrives while this commit runs
            group.submit_later(nxt, lambda error: None)
        done(None)

    group._commit = commit
    group.submit(0)
    assert len(depth) == 600
    assert max(depth) - min(depth) <= 2


def test_async_commit_that_raises_fails_its_batch() -> None:
    def commit(batch: list[int], done: Any) -> None:
        raise ValueError(f"bad batch {batch}")

    group: AsyncGroupCommit[int] = AsyncGroupCommit(commit)
    with pytest.raises(ValueError, match=r"bad batch \[1\]"):
        group.submit(1)
    with pytest.raises(ValueError, match=r"bad batch \[2\]"):  # and the next one still runs
        group.submit(2)


# -- LoopGroupCommit: coroutines on an event loop ----------------------------------


def test_loop_group_commit_batches_a_turn_and_what_comes_meanwhile() -> None:
    """The 100 coroutines of one turn go out in one commit; the 50 that come
    while it runs go in the next; one commit under way at a time."""
    batches: list[list[int]] = []
    running = [0]
    most = [0]

    async def commit(batch: list[int]) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.05)  # (a commit that takes a while: others come meanwhile)
        batches.append(batch)
        running[0] -= 1

    group: LoopGroupCommit[int] = LoopGroupCommit(commit)

    async def main() -> None:
        first = [asyncio.ensure_future(group.submit(i)) for i in range(100)]
        while not running[0]:  # the first commit under way
            await asyncio.sleep(0)
        later = [asyncio.ensure_future(group.submit(i)) for i in range(100, 150)]
        await asyncio.gather(*first, *later)

    asyncio.run(main())
    assert batches == [list(range(100)), list(range(100, 150))]
    assert most[0] == 1 and group.commits == 2


def test_loop_group_commit_failure_reaches_its_batch_and_each_loop_has_its_own() -> None:
    """A commit that raises fails every caller of its batch, the next batch
    goes on; two loops (two threads) never share a batch."""
    seen: list[tuple[int, list[str]]] = []

    async def commit(batch: list[str]) -> None:
        seen.append((threading.get_ident(), batch))
        if "bad" in batch:
            raise ValueError("refused")

    group: LoopGroupCommit[str] = LoopGroupCommit(commit)

    async def failing() -> list[BaseException | None]:
        out = await asyncio.gather(group.submit("a"), group.submit("bad"), return_exceptions=True)
        await group.submit("after")
        return list(out)

    results = asyncio.run(failing())
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert [b for _, b in seen] == [["a", "bad"], ["after"]]

    seen.clear()
    started = threading.Barrier(2)

    def on_a_loop(name: str) -> None:
        async def main() -> None:
            started.wait(10)
            await asyncio.gather(*(group.submit(f"{name}{i}") for i in range(10)))

        asyncio.run(main())

    threads = [threading.Thread(target=on_a_loop, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for ident, batch in seen:
        assert len({item[0] for item in batch}) == 1  # one loop's items only
        assert ident in {t.ident for t in threads}
    assert sorted(item for _, b in seen for item in b) == sorted(
        f"{n}{i}" for n in ("x", "y") for i in range(10)
    )
