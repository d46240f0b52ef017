"""Chaos on Redis: a redis-server of the test's own (AOF, fsync always),
SIGKILLed and restarted twice, client connections cut, workers killed."""

import os
from pathlib import Path

from kew.testing.util import require
from tests.brokers.redis import RedisServer
from tests.chaos.driver import run_chaos


def test_chaos_redis(tmp_path: Path) -> None:
    require(RedisServer.available(), "redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    try:
        tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
        s = run_chaos(server, tmp_path, tasks=tasks)
    finally:
        server.kill()
    print("\n" + s.line())
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.duplicates < s.allowed_duplicates
