"""Idempotent side effects under chaos, on SQLite and Redis.

The chaos driver's usual run (workers SIGKILLed, the broker restarted,
connections cut) with workers that do each task's side effect through a
``kew.idempotency`` store on the same backend.  Handler executions repeat
(at-least-once); the effect written in the store's transaction
(``atomic_once``) must not: exactly one per processed task, none for the
dead-lettered ones.  The claimed effect (``once``) may repeat only for a
worker killed between its effect and its done mark: counted and bounded.
KEW_CHAOS_TASKS sets the task count (default 1000).
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from pathlib import Path

import redis

from kew.testing.util import require
from tests.brokers.redis import RedisServer
from tests.chaos.driver import Summary, _read_ints, run_chaos
from tests.chaos.idem_worker import EFFECTS_KEY
from tests.chaos.test_chaos_sqlite import SqliteChaos

TASKS = int(os.environ.get("KEW_CHAOS_TASKS", "1000"))


def check(s: Summary, workdir: Path, effects: Counter[int]) -> None:
    executions = Counter(_read_ints(workdir / "done.log"))
    claimed = Counter(_read_ints(workdir / "once.log"))
    failing = {t for t in range(TASKS) if t % 97 == 0}
    atomic_dups = sum(n - 1 for n in effects.values() if n > 1)
    claimed_dups = sum(n - 1 for n in claimed.values() if n > 1)
    print(
        f"\n{s.line()}\nidempotency[{s.broker}]: executions={sum(executions.values())} "
        f"(duplicates={s.duplicates}) claimed-effect repeats={claimed_dups} "
        f"atomic effects={sum(effects.values())} for {len(executions)} tasks "
        f"(duplicates={atomic_dups}, missing={len(set(executions) - set(effects))})"
    )
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.processed + s.dead >= TASKS
    assert s.dead == len(failing)  # only the failing tasks: no idempotency error dead-lettered any
    # exactly once: every processed task has one atomic effect, failing ones none
    assert set(effects) == set(executions)
    assert all(n == 1 for n in effects.values()), effects.most_common(3)
    assert not set(effects) & failing
    # the claimed effect happened for every processed task; repeats only from kills
    assert set(claimed) >= set(executions)
    assert claimed_dups <= s.kills * 2


def test_chaos_idempotency_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "chaos.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE chaos_effect (task INTEGER NOT NULL)")  # no UNIQUE: count repeats
    s = run_chaos(
        SqliteChaos(path),
        tmp_path,
        tasks=TASKS,
        cuts=0,
        worker_module="tests.chaos.idem_worker",
        worker_args=["sqlite"],
    )
    with sqlite3.connect(path) as db:
        effects = Counter(t for (t,) in db.execute("SELECT task FROM chaos_effect"))
    check(s, tmp_path, effects)


def test_chaos_idempotency_redis(tmp_path: Path) -> None:
    require(RedisServer.available(), "redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    try:
        s = run_chaos(
            server,
            tmp_path,
            tasks=TASKS,
            worker_module="tests.chaos.idem_worker",
            worker_args=["redis"],
        )
        r = redis.Redis(host="127.0.0.1", port=server.port)
        effects = Counter({int(k): int(v) for k, v in r.hgetall(EFFECTS_KEY).items()})
        r.close()
    finally:
        server.kill()
    check(s, tmp_path, effects)
