import pytest

from kew.testing.conformance import ProviderConformance


class TestMemoryConformance(ProviderConformance):
    @pytest.fixture
    def url(self) -> str:
        return "memory://conformance?max_message_size=65536"
