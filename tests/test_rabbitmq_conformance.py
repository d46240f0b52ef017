import pytest

from kew.testing.conformance import ProviderConformance
from kew.testing.util import port_open, require


class TestRabbitConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
        return "amqp://guest:guest@127.0.0.1:5672/?max_message_size=1048576&delay_granularity=50"


class TestRabbitQuorumConformance(ProviderConformance):
    """The same kit on quorum queues (exact delivery counts)."""

    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
        return (
            "amqp://guest:guest@127.0.0.1:5672/"
            "?max_message_size=1048576&delay_granularity=50&queue_type=quorum"
        )
