"""The monitoring page in headless Chromium (Debian's ``chromium``, driven
by Playwright with ``executable_path``): it loads, shows the queues, and a
task's output following live.  A screenshot is written for a person."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kew.testing.util import require, wait_for
from tests.apps.web_server import WebServer

pytestmark = pytest.mark.timeout(240)

CHROMIUM = os.environ.get("KEW_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("KEW_SCREENSHOT_DIR", "/tmp/kew-web-screenshots"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    s = WebServer(tmp_path_factory.mktemp("webpage")).start()
    try:
        yield s
    finally:
        s.stop()


def test_monitoring_page(server: WebServer, capsys: pytest.CaptureFixture[str]) -> None:
    require(
        Path(CHROMIUM).exists() or shutil.which("chromium") is not None,
        f"no chromium at {CHROMIUM} (scripts/install-test-tools installs it)",
    )
    sync_api = pytest.importorskip("playwright.sync_api")

    with server.client(server.admin) as api:
        done = api.post("/queues/thumbs/tasks", json={"image_id": 41}).json()["id"]
        api.post("/queues/thumbs/tasks", json={"image_id": 42, "note": "fail"})
        running = api.post("/queues/slow/tasks", json={"name": "page"}).json()["id"]
        wait_for(
            lambda: api.get(f"/tasks/{done}").json()["status"] == "succeeded",
            30,
            what="the first task to succeed",
        )
        wait_for(
            lambda: api.get(f"/tasks/{running}").json()["status"] == "running",
            30,
            what="the slow task to run",
        )

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{server.base}/ui")
            assert page.url.endswith("/ui/login")  # no session: the login form
            page.fill("#token", "wrong-token-0123456789")
            page.click("button[type=submit]")
            assert "Unknown token" in page.inner_text("#login-error")
            page.fill("#token", server.read)
            page.click("button[type=submit]")
            page.wait_for_selector("#queues")

            queues = page.inner_text("#queues")
            for name in ("thumbs", "slow", "kew.task-events"):
                assert name in queues
            assert page.locator(f'#tasks tr[data-task="{done}"]').count() == 1
            assert "succeeded" in page.inner_text(f'#tasks tr[data-task="{done}"]')
            assert "failed" in page.inner_text("#tasks")
            overview = SHOTS / "overview.png"
            page.screenshot(path=str(overview), full_page=True)

            # A running task's page follows its output live.
            page.click(f'#tasks tr[data-task="{running}"] a')
            page.wait_for_function(
                "document.getElementById('output').textContent.includes('job page started')"
            )
            assert "running" in page.inner_text("#task-status")
            (server.dir / "release-page").touch()
            page.wait_for_function(
                "document.getElementById('output').textContent.includes('job page released')"
            )
            page.wait_for_function(
                "document.getElementById('task-status').textContent.includes('succeeded')"
            )
            assert page.inner_text("#output").count("job page started") == 1
            task_shot = SHOTS / "task.png"
            page.screenshot(path=str(task_shot), full_page=True)
        finally:
            browser.close()
    assert overview.stat().st_size > 10_000
    line = f"monitoring page screenshots: {overview} {task_shot}"
    with capsys.disabled():  # shown even when output is captured
        print(f"\n{line}")
