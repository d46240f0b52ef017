"""The conformance kit through kew.aio on every provider: memory, SQLite,
Redis, RabbitMQ (classic and quorum queues) and RabbitMQ's STOMP plugin by
their native routes (ActiveMQ's STOMP: tests/test_stomp_aio.py)."""

from pathlib import Path

import pytest

from kew.testing.aio_conformance import AsyncProviderConformance
from kew.testing.util import port_open, require
from tests.brokers.stomp_server import require_rabbitmq_stomp


class TestMemoryAsync(AsyncProviderConformance):
    expected_route = "native"

    @pytest.fixture
    def url(self) -> str:
        return "memory://aio-conformance?max_message_size=65536"


class TestSqliteAsync(AsyncProviderConformance):
    expected_route = "native"
    crash_redelivery_timeout = 20.0

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/aio.sqlite3?lease=1&max_message_size=1048576"


class TestRedisAsync(AsyncProviderConformance):
    expected_route = "native"
    crash_redelivery_timeout = 20.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
        return "redis://127.0.0.1:6379/15?lease=1&prefix=aiokit&max_message_size=1048576"


class TestRabbitAsync(AsyncProviderConformance):
    expected_route = "native"
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
        return "amqp://guest:guest@127.0.0.1:5672/?delay_granularity=50&max_message_size=1048576"


class TestRabbitQuorumAsync(AsyncProviderConformance):
    """The same kit on quorum queues (exact delivery counts, no browsing)."""

    expected_route = "native"
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
        return (
            "amqp://guest:guest@127.0.0.1:5672/"
            "?delay_granularity=50&max_message_size=1048576&queue_type=quorum"
        )


class TestRabbitStompAsync(AsyncProviderConformance):
    expected_route = "native"
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require_rabbitmq_stomp()  # RabbitMQ answers on 61613, not another STOMP server
        return "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&max_message_size=1048576"
