from pathlib import Path

import pytest

from kew.testing.conformance import ProviderConformance


class TestSqliteConformance(ProviderConformance):
    crash_redelivery_timeout = 20.0

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/kit.sqlite3?lease=1&max_message_size=1048576"
