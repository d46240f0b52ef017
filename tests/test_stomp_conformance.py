"""The conformance kit on real STOMP brokers: the tests' own ActiveMQ
(dialect=activemq), RabbitMQ's STOMP plugin on the machine's RabbitMQ
(dialect=rabbitmq) and, when KEW_ARTEMIS_URL names one, an Artemis broker."""

import os

import pytest

from kew.testing.conformance import ProviderConformance
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp


class TestActiveMQConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self, activemq: ActiveMQServer) -> str:
        # the fixture's broker was checked to answer as ActiveMQ on its port
        return f"stomp://127.0.0.1:{activemq.port}/?dialect=activemq&max_message_size=1048576"


class TestRabbitStompConformance(ProviderConformance):
    crash_redelivery_timeout = 30.0

    @pytest.fixture
    def url(self) -> str:
        require_rabbitmq_stomp()  # RabbitMQ answers on 61613, not another STOMP server
        return "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq&max_message_size=1048576"


if os.environ.get("KEW_ARTEMIS_URL"):  # an Artemis broker of the user's: run the kit there too

    class TestArtemisConformance(ProviderConformance):
        crash_redelivery_timeout = 60.0

        @pytest.fixture
        def url(self) -> str:
            return os.environ["KEW_ARTEMIS_URL"]
