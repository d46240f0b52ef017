"""Helpers of the task-store tests (tests/test_task_store.py, tests/test_task_store_shared.py):
fresh PostgreSQL schemas, event streams like a recorder's, what a reader sees."""

from __future__ import annotations

import importlib.util
import os
import random
import threading
from typing import Any

from kew.task import MemoryTaskStore, TaskEvent, TaskStore, open_store
from kew.testing.util import port_open, require

PG = "postgresql://postgres@127.0.0.1:5432/test"


def suffix() -> str:
    return os.urandom(4).hex()


def admin() -> Any:
    import psycopg

    return psycopg.connect(PG, autocommit=True)


class Schemas:
    """Fresh PostgreSQL schemas (``kew_test_<random>``), dropped at the end."""

    def __init__(self) -> None:
        require(port_open("127.0.0.1", 5432), "PostgreSQL is not running on 127.0.0.1:5432")
        require(
            importlib.util.find_spec("psycopg") is not None,
            "psycopg is not installed (pip install -e '.[postgres]')",
        )
        self.names: list[str] = []

    def url(self) -> str:
        name = f"kew_test_{suffix()}"
        self.names.append(name)
        return f"{PG}?schema={name}"

    def drop(self) -> None:
        with admin() as conn:
            for name in self.names:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def ev(kind: str, attempt: int = 1, run: int = 100, at: int = 1000, **kw: object) -> TaskEvent:
    return TaskEvent("t1", "q", kind, at, attempt=attempt, run=run, **kw)  # type: ignore[arg-type]


def snapshot(store: TaskStore, ids: list[str]) -> dict[str, Any]:
    """Everything a reader can see of ``ids`` (and the workers), comparable."""
    return {
        "records": {tid: store.get(tid) for tid in ids},
        "output": {tid: store.output(tid) for tid in ids},
        "recent": store.recent(len(ids) + 10),
        "workers": store.workers(),
    }


def lifecycle(tid: str, rng: random.Random, t0: int, any_order: bool) -> list[TaskEvent]:
    """The events of one task's life, in the order a worker sends them:
    attempts that fail and are retried, runs handed back and run again.

    ``any_order``: only events whose outcome is the same in any order (no
    hand-backs, whose effect depends on when they come; one retry error text,
    since a late error is kept only while the record has none)."""
    q = f"q{int(tid[-1], 16) % 3}"
    evs = [TaskEvent(tid, q, "queued", t0)]
    at, attempt = t0, 1
    for _ in range(6):
        if rng.random() < 0.15:  # not over yet: left queued, running or to be retried
            break
        at += rng.randint(1, 50)
        run, worker = at, f"w{rng.randint(1, 3)}"
        if rng.random() < 0.7:
            evs.append(TaskEvent(tid, q, "running", at, attempt=attempt, run=run, worker=worker))
        for seq in range(rng.randint(0, 3)):
            at += 1
            text = f"{tid} attempt {attempt} run {run} line {seq}\n"
            evs.append(
                TaskEvent(tid, q, "output", at, attempt=attempt, run=run, seq=seq, text=text)
            )
        at += 1
        weights = [4, 0 if any_order else 2, 3, 1]
        end = rng.choices(["retry", "released", "succeeded", "failed"], weights)[0]
        kw: dict[str, Any] = {"attempt": attempt, "run": run, "worker": worker}
        if end == "retry":
            evs.append(
                TaskEvent(
                    tid,
                    q,
                    "retry-scheduled",
                    at,
                    error="E" if any_order else f"E{attempt}",
                    next_at=at + 5,
                    **kw,
                )
            )
            attempt += 1
        elif end == "released":
            evs.append(TaskEvent(tid, q, "released", at, **kw))
        else:
            evs.append(TaskEvent(tid, q, end, at, error="E!" if end == "failed" else "", **kw))  # type: ignore[arg-type]
            break
    return evs


def stream(seed: int, tasks: int, any_order: bool = False) -> tuple[list[TaskEvent], list[str]]:
    """The lives of ``tasks`` tasks, interleaved (each in its own order), with
    workers' heartbeats among them; and the task ids."""
    rng = random.Random(seed)
    ids = [f"task-{seed}-{i:04x}" for i in range(tasks)]
    lives = [lifecycle(tid, rng, 1_000 + rng.randint(0, 500), any_order) for tid in ids]
    out: list[TaskEvent] = []
    while any(lives):
        life = rng.choice([x for x in lives if x])
        out.append(life.pop(0))
        if rng.random() < 0.05:
            out.append(TaskEvent("", "", "worker", len(out), worker=f"w{rng.randint(1, 3)}"))
    return out, ids


def batches(events: list[TaskEvent], rng: random.Random, most: int) -> list[list[TaskEvent]]:
    """``events`` in batches of random sizes, some with a repeat of an earlier
    event (a redelivery) added at the end."""
    out: list[list[TaskEvent]] = []
    i = 0
    while i < len(events):
        n = rng.randint(1, most)
        batch = events[i : i + n]
        i += n
        if rng.random() < 0.3:
            batch = [*batch, events[rng.randrange(min(i, len(events)))]]
        out.append(batch)
    return out


def reference(events: list[TaskEvent], ids: list[str]) -> dict[str, Any]:
    one = MemoryTaskStore()
    for e in events:
        one.apply([e])
    return snapshot(one, ids)


def record(
    url: str,
    plan: list[list[TaskEvent]],
    start: threading.Barrier,
    step: threading.Barrier | None,
    errors: list[BaseException],
) -> None:
    """A recorder: its own store connection applying ``plan``'s batches (each
    after the other recorder's ``step`` when given)."""
    store = open_store(url)
    try:
        start.wait(10)
        for batch in plan:
            if step is not None:
                step.wait(30)
            store.apply(batch)
    except BaseException as e:
        errors.append(e)
        if step is not None:
            step.abort()
    finally:
        store.close()


def recorders(url: str, plans: list[list[list[TaskEvent]]], lockstep: bool) -> None:
    """Run one recorder per plan at once, each with its own connection."""
    start = threading.Barrier(len(plans))
    step = threading.Barrier(len(plans)) if lockstep else None
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=record, args=(url, plan, start, step, errors)) for plan in plans
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def split_lives(
    steps: int, per_step: int
) -> tuple[list[TaskEvent], list[TaskEvent], list[list[TaskEvent]]]:
    """Tasks whose first attempt fails and second succeeds: the whole stream;
    their submits (to apply first, so that their records exist); and, for each
    step, a batch of the first attempts of ``per_step`` tasks then one of their
    second attempts (for two recorders at the same moment)."""
    submits: list[TaskEvent] = []
    halves: list[list[TaskEvent]] = []
    for step in range(steps):
        first: list[TaskEvent] = []
        second: list[TaskEvent] = []
        for i in range(per_step):
            tid, t = f"split-{step:03d}-{i:02d}", 1000 * step + i
            submits.append(TaskEvent(tid, "q", "queued", t))
            first += [
                TaskEvent(tid, "q", "running", t + 10, attempt=1, run=t + 10, worker="w1"),
                TaskEvent(tid, "q", "retry-scheduled", t + 20, attempt=1, run=t + 10, error="E"),
            ]
            second += [
                TaskEvent(tid, "q", "running", t + 30, attempt=2, run=t + 30, worker="w2"),
                TaskEvent(tid, "q", "output", t + 31, attempt=2, run=t + 30, text="ok\n"),
                TaskEvent(tid, "q", "succeeded", t + 32, attempt=2, run=t + 30, worker="w2"),
            ]
        halves += [first, second]
    return submits + [e for h in halves for e in h], submits, halves
