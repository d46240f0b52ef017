"""GET /health tells the truth about the broker: a ``kew serve`` on a
redis-server of the test's own answers 503 while that server is killed and
200 again once it is back, without a restart of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from kew.testing.util import require, wait_for
from tests.apps.web_server import WebServer
from tests.brokers.redis import RedisServer

pytestmark = pytest.mark.timeout(180)


def _health(server: WebServer) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{server.base}/health", timeout=30)
    return r.status_code, r.json()


def test_health_follows_the_broker(tmp_path: Path) -> None:
    require(RedisServer.available(), "redis-server is not installed")
    (tmp_path / "redis").mkdir()
    broker = RedisServer(tmp_path / "redis")
    broker.start()
    server = WebServer(tmp_path, url=f"redis://127.0.0.1:{broker.port}/0?retries=2")
    try:
        server.start()
        code, doc = _health(server)
        assert (code, doc["status"], doc["broker"]) == (200, "ok", True)

        broker.kill()
        code, doc = wait_for(
            lambda: (h := _health(server))[0] == 503 and h, 60, what="/health to report 503"
        )
        assert doc["status"] == "unavailable" and doc["broker"] is False
        assert "broker" in doc["detail"]
        assert str(broker.port) not in doc["detail"]  # no connection details leak

        broker.start()
        code, doc = wait_for(
            lambda: (h := _health(server))[0] == 200 and h, 60, what="/health to recover"
        )
        assert doc["broker"] is True
        # The API works again too.
        with server.client(server.admin) as c:
            assert c.post("/queues/thumbs/tasks", json={"image_id": 5}).status_code == 202
    finally:
        server.stop()
        broker.kill()
