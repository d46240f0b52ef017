"""Chaos on RabbitMQ: the session's own node (durable queues, persistent
messages, publisher confirms), SIGKILLed and restarted twice, client
connections closed by the broker, workers killed. KEW_CHAOS_TASKS sets the
task count."""

import os
from pathlib import Path

from tests.brokers.rabbitmq import RabbitMQServer
from tests.chaos.driver import run_chaos


def test_chaos_rabbitmq(rabbitmq_node: RabbitMQServer, tmp_path: Path) -> None:
    tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
    s = run_chaos(rabbitmq_node, tmp_path, tasks=tasks)
    print("\n" + s.line())
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.duplicates < s.allowed_duplicates
