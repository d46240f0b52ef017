"""docs/async.md: every Python block parses (top-level await allowed), and
the Litestar example runs as written: connect on start-up, a request sends,
the app's own sink consumes, close on shutdown."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

from kew.testing.util import wait_for

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "async.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)


def test_every_block_parses() -> None:
    blocks = _blocks()
    assert len(blocks) >= 5
    for block in blocks:
        compile(block, str(PAGE), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_litestar_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("litestar")
    from litestar.testing import TestClient

    (example,) = [b for b in _blocks() if "Litestar(" in b and "kew_lifespan" in b]
    (tmp_path / "aio_litestar_example.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KEW_URL", "memory://docs-async")
    module = importlib.import_module("aio_litestar_example")
    try:
        with TestClient(module.app) as client:
            r = client.post("/thumbnails", json={"image_id": 7})
            assert r.status_code == 201, r.text
            assert len(r.json()["id"]) == 32
            wait_for(lambda: module.rendered == [7], 10, what="the app's sink to render it")
            queue = client.app.state.thumbnails
        # shut down: the sink stopped, the connector closed
        assert queue.connector.url == "memory://docs-async"
    finally:
        sys.modules.pop("aio_litestar_example", None)
