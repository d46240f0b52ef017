"""The conformance kit on real STOMP brokers: the tests' own ActiveMQ
(dialect=activemq), RabbitMQ's STOMP plugin on the machine's RabbitMQ
(dialect=rabbitmq) and, when KEW_ARTEMIS_URL names one, an Artemis broker."""

import os

import pytest

from kew.testing.conformance import ProviderConformance
from kew.testing.util import port_open, require
from tests.brokers.activemq import ActiveMQServer


class TestActiveMQConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self, activemq: ActiveMQServer) -> str:
        return f"stomp://127.0.0.1:{activemq.port}/?dialect=activemq&max_message_size=1048576"


class TestRabbitStompConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 61613), "RabbitMQ STOMP is not reachable on 127.0.0.1:61613")
        return "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&max_message_size=1048576"


if os.environ.get("KEW_ARTEMIS_URL"):  # an Artemis broker of the user's: run the kit there too

    class TestArtemisConformance(ProviderConformance):
        crash_redelivery_timeout = 60.0

        @pytest.fixture
        def url(self) -> str:
            return os.environ["KEW_ARTEMIS_URL"]
