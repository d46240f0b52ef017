"""schemathesis against the OpenAPI document a real ``kew serve`` generates:
no 5xx, and every response matches the document (status, content type,
headers, body schema).  Examples are bounded so it takes about half a minute
(``KEW_WEB_FUZZ_EXAMPLES`` raises the count)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.apps.web_server import WebServer

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("KEW_WEB_FUZZ_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Not negative_data_rejection: the test adds the bearer token to every case
# (schemathesis's "missing Authorization" cases get it back), and unknown
# query parameters are ignored, as HTTP servers do.  Negative cases still
# must not 5xx and must be answered as documented.


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    d = tmp_path_factory.mktemp("webfuzz")
    (d / "release-all").touch()  # fuzzed `slow` tasks finish at once
    s = WebServer(d).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def web_schema(server: WebServer) -> Any:
    doc = httpx.get(
        f"{server.base}/schema/openapi.json", headers={"Authorization": f"Bearer {server.admin}"}
    ).json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.base_url = server.base
    return schema


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_matches_its_openapi_document(server: WebServer, web_schema: Any, mode: str) -> None:
    generation_mode = schemathesis.GenerationMode(mode)
    headers = {"Authorization": f"Bearer {server.admin}"}
    operations = [result.ok() for result in web_schema.get_all_operations()]
    assert len(operations) >= 10  # every route of the document is exercised
    before = server.log().count(" HTTP/1.1")
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=generation_mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def call(case: Any) -> None:
            case.call_and_validate(base_url=server.base, headers=headers, checks=CHECKS, timeout=30)

        try:
            call()
        except Unsatisfiable:
            # Nothing to break in this operation's request (GET /health).
            assert mode == "negative", operation.label
    sent = server.log().count(" HTTP/1.1") - before
    print(f"\nschemathesis ({mode}): {len(operations)} operations, {sent} requests")
    assert sent >= len(operations)
