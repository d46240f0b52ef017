"""Shared fixtures. Brokers that are slow to start live once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers.activemq import ActiveMQServer


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
