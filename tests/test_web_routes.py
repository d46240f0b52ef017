"""Routes of an application's own, added to kew.web's, behind the same
guard (in-process ASGI client over a real memory:// app)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar import get
from litestar.testing import TestClient

from kew.task.app import App
from kew.web import Token, WebConfig, create_app

READ = "read-token-for-routes-0001"
ADMIN = "admin-token-for-routes-0001"


@get("/extra/public", opt={"scope": "public"})
async def public() -> str:
    return "public"


@get("/extra/read")
async def reading() -> str:
    return "read"


@get("/extra/admin", opt={"scope": "admin"})
async def admin_only() -> str:
    return "admin"


@pytest.fixture
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    app = App("memory://", name="routes", store="memory://")
    config = WebConfig(tokens=[Token.plain("read", READ), Token.plain("admin", ADMIN)])
    with TestClient(create_app(app, config, routes=[public, reading])) as c:
        c.app.register(admin_only)  # later, the same way
        yield c
    app.close()


def test_extra_routes_keep_their_scope(client: TestClient) -> None:  # type: ignore[type-arg]
    def status(path: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return client.get(path, headers=headers).status_code

    assert status("/extra/public", None) == 200
    assert status("/extra/read", None) == 401
    assert status("/extra/read", READ) == 200
    assert status("/extra/admin", READ) == 403
    assert status("/extra/admin", ADMIN) == 200
    assert client.get("/extra/admin", headers={"Authorization": f"Bearer {ADMIN}"}).text == "admin"
