"""Chaos on ActiveMQ over STOMP: the session's own ActiveMQ (KahaDB, its
journal synced on every write), SIGKILLed and restarted twice, client
connections cut, workers killed. KEW_CHAOS_TASKS sets the task count."""

import os
from pathlib import Path

from tests.brokers.activemq import ActiveMQServer
from tests.chaos.driver import run_chaos


def test_chaos_activemq(activemq: ActiveMQServer, tmp_path: Path) -> None:
    tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
    s = run_chaos(activemq, tmp_path, tasks=tasks)
    print("\n" + s.line())
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.duplicates < s.allowed_duplicates
