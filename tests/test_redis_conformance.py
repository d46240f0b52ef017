import pytest

from kew.testing.conformance import ProviderConformance
from kew.testing.util import port_open, require


class TestRedisConformance(ProviderConformance):
    crash_redelivery_timeout = 20.0

    @pytest.fixture
    def url(self) -> str:
        require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
        return "redis://127.0.0.1:6379/15?lease=1&prefix=kit&max_message_size=1048576"
