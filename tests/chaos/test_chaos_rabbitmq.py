"""Chaos on RabbitMQ: the session's own node (durable queues, persistent
messages, publisher confirms), SIGKILLed and restarted twice, client
connections closed by the broker, workers killed; with classic and with
quorum queues. KEW_CHAOS_TASKS sets the task count."""

import os
from pathlib import Path

import pytest

from tests.brokers.rabbitmq import RabbitMQServer
from tests.chaos.driver import BATCH, run_chaos


class _QueueType:
    """The session's node, with URLs for one queue type."""

    restart_kills_clients = False

    def __init__(self, node: RabbitMQServer, queue_type: str) -> None:
        self.node = node
        self.name = f"rabbitmq-{queue_type}"
        self.url = f"{node.url}&queue_type={queue_type}"

    def restart(self) -> None:
        self.node.restart()

    def cut_connections(self) -> None:
        self.node.cut_connections()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_chaos_rabbitmq(rabbitmq_node: RabbitMQServer, tmp_path: Path, queue_type: str) -> None:
    tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
    s = run_chaos(_QueueType(rabbitmq_node, queue_type), tmp_path, tasks=tasks)
    allowed = s.allowed_duplicates
    if queue_type == "classic":
        # A classic queue writes the acks it received to disk lazily (on its
        # sync timer, later under load): after a SIGKILL, what was acked in
        # the node's last fraction of a second comes again.  The producer
        # writes BATCH tasks every 0.25 s; allow half a second of them.
        allowed += s.restarts * 2 * BATCH
    print(
        "\n"
        + s.line()
        + (f"; classic queue: allowed < {allowed}" if queue_type == "classic" else "")
    )
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.duplicates < allowed, f"{s.duplicates} duplicates, allowed < {allowed}"
