"""The complete FastAPI and Litestar examples (examples/web_frameworks/), run
as written through each framework's test client: the lifespan starts a kew
worker, a POST submits an async task (checked against its type first: a bad
body is a 4xx that says why), its output streams until the task ends, its
status reads succeeded; shutdown stops the worker gracefully."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kew.testing.util import wait_for

MODULES = (
    "examples.web_frameworks.tasks",
    "examples.web_frameworks.fastapi_app",
    "examples.web_frameworks.litestar_app",
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("KEW_URL", f"sqlite:///{tmp_path}/q.sqlite3")
    monkeypatch.setenv("KEW_STORE", f"sqlite:///{tmp_path}/tasks.sqlite3")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    for m in MODULES:
        sys.modules.pop(m, None)
    yield
    for m in MODULES:
        sys.modules.pop(m, None)


def _client(framework: str) -> Any:
    if framework == "fastapi":
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        return TestClient(importlib.import_module("examples.web_frameworks.fastapi_app").app)
    from litestar.testing import TestClient as LitestarClient

    return LitestarClient(importlib.import_module("examples.web_frameworks.litestar_app").app)


@pytest.mark.parametrize("framework", ["fastapi", "litestar"])
def test_submit_stream_output_and_status(env: None, framework: str) -> None:
    with _client(framework) as client:
        r = client.post("/thumbnails", json={"image_id": 7, "size": 128})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        assert len(task_id) == 32
        # known once the recorder has stored its queued event (a moment)
        wait_for(lambda: client.get(f"/tasks/{task_id}").status_code == 200, 20, what="status")
        with client.stream("GET", f"/tasks/{task_id}/output") as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/plain")
            text = "".join(streamed.iter_text())  # ends when the task does
        assert "image 7: fetching at 128px\n" in text
        assert text.endswith("image 7: done\n"), text
        r = client.get(f"/tasks/{task_id}")
        assert r.status_code == 200
        assert r.json()["status"] == "succeeded"
        assert client.get("/tasks/" + "0" * 32).status_code == 404
        assert client.get("/tasks/" + "0" * 32 + "/output").status_code == 404
        bad = client.post("/thumbnails", json={"image_id": "seven"})
        assert bad.status_code in (400, 422), bad.text
        assert "image_id" in bad.text
    tasks = importlib.import_module("examples.web_frameworks.tasks").tasks
    assert tasks.event_loop._loop is None  # the app closed on shutdown, its loop with it


def test_docs_show_the_examples_as_they_are() -> None:
    """docs/async.md shows each example file whole, as it is."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "async.md").read_text()
    for name in ("tasks.py", "fastapi_app.py", "litestar_app.py"):
        code = (root / "examples" / "web_frameworks" / name).read_text()
        assert f"```python\n{code}```" in page, f"docs/async.md differs from {name}"
