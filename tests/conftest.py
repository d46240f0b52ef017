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
