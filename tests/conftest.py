"""Shared fixtures. Brokers that are slow to start live once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers.activemq import ActiveMQServer
from tests.brokers.rabbitmq import RabbitMQServer


@pytest.fixture(scope="session")
def activemq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActiveMQServer]:
    """One ActiveMQ of the tests' own for the whole session (JVM start-up
    is slow): the STOMP kit, restart, TLS and chaos tests share it."""
    from kew.testing.util import require

    require(ActiveMQServer.available(), "ActiveMQ (Debian package activemq) is not installed")
    server = ActiveMQServer(tmp_path_factory.mktemp("activemq"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """One RabbitMQ node of the tests' own for the whole session (not the
    machine's shared one): the restart, TLS and chaos tests share it."""
    from kew.testing.util import require

    require(
        RabbitMQServer.available(), "RabbitMQ (Debian package rabbitmq-server) is not installed"
    )
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _rabbit_queues() -> set[str] | None:
    """The machine's RabbitMQ queue names (None when rabbitmqctl cannot tell)."""
    import shutil
    import subprocess

    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        r = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return set(r.stdout.split()) if r.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _rabbitmq_left_clean() -> Iterator[None]:
    """Queues the tests make on the machine's RabbitMQ and cannot delete
    through kew (RabbitMQ's STOMP plugin deletes no queue; a killed consumer's
    delay queues) are deleted when the session ends: only queues that did not
    exist when it began, and only those no consumer uses (``if_unused``: a
    concurrent session's or a benchmark's queue in use is left alone), and
    never a benchmark's (``bench`` prefix)."""
    before = _rabbit_queues()
    yield
    if before is None:
        return
    after = _rabbit_queues() or set()
    new = sorted(n for n in after - before if not n.startswith("bench"))
    if not new:
        return
    try:
        import pika

        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        try:
            for name in new:
                channel = conn.channel()
                try:
                    channel.queue_delete(name, if_unused=True)
                    channel.close()
                except pika.exceptions.AMQPError:
                    continue
        finally:
            conn.close()
    except Exception:  # best effort: the broker may be gone by now
        return
