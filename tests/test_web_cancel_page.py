"""Cancelling from the page, in headless Chromium (as
tests/test_web_console_page.py drives it): a command task running ``sleep
60`` in a ``kew serve`` process is cancelled with the task page's button
and its confirmation step; the page then shows it ``cancelled``, with its
output, and the process is gone."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from kew.testing.util import require, wait_for
from tests.apps.cancel_server import CancelServer
from tests.test_web_console_page import ARGS, CHROMIUM, LOCAL

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CancelServer]:
    s = CancelServer(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_cancel_a_running_command_task_from_the_page(server: CancelServer) -> None:
    require(
        Path(CHROMIUM).exists() or shutil.which("chromium") is not None,
        f"no chromium at {CHROMIUM} (scripts/install-test-tools installs it)",
    )
    sync_api = pytest.importorskip("playwright.sync_api")
    with closing(server.client(server.admin)) as api:
        tid = api.post("/queues/cancel.sleep/tasks", json="page").json()["id"]

        def output() -> str:
            return str(api.get(f"/tasks/{tid}/output", params={"follow": "false"}).text)

        wait_for(lambda: "sleeping as" in output(), 30, what="the command running")
        m = re.search(r"sleeping as (\d+)", output())
        assert m is not None
        pid = int(m.group(1))
        assert not gone(pid)

        foreign: list[str] = []

        def only_local(route: Any) -> None:
            if urlsplit(route.request.url).hostname in LOCAL:
                route.continue_()
            else:
                foreign.append(route.request.url)
                route.abort()

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                ctx = browser.new_context(viewport={"width": 1280, "height": 860})
                ctx.route("**/*", only_local)
                page = ctx.new_page()
                page.goto(f"{server.base}/ui/login")
                page.fill("#token", server.admin)
                page.click("button[type=submit]")
                page.wait_for_selector("#queues")

                page.goto(f"{server.base}/ui/tasks/{tid}")
                assert page.inner_text("#task-status") == "running"
                page.wait_for_function(
                    "document.getElementById('output').textContent.includes('sleeping as')"
                )
                page.click("#cancel-task")
                page.wait_for_selector("#confirm")
                assert "running" in page.inner_text("#confirm")
                assert api.get(f"/tasks/{tid}").json()["status"] == "running"  # not yet
                page.click("#confirm-yes")
                page.wait_for_selector("#flash")
                assert page.url.startswith(f"{server.base}/ui/tasks/{tid}")
                # the page refreshes the status every 2 s: it turns "cancelled"
                page.wait_for_function(
                    "document.getElementById('task-status').textContent === 'cancelled'",
                    timeout=20_000,
                )
                badge = page.locator("#task-status")
                assert "s-cancelled" in (badge.get_attribute("class") or "")
                colour = badge.evaluate("e => getComputedStyle(e).backgroundColor")
                assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
                assert page.locator("#cancel-task").count() == 0  # final: no button
                page.wait_for_function(
                    "document.getElementById('output').textContent"
                    ".includes('the task was cancelled')"
                )
                text = page.inner_text("#output")
                assert f"page: sleeping as {pid}" in text  # the output is kept
                assert "cancel-asked" in page.content()
            finally:
                browser.close()
        assert api.get(f"/tasks/{tid}").json()["status"] == "cancelled"
        assert gone(pid)
    assert foreign == [], foreign
    audit = [line for line in server.log().splitlines() if "audit:" in line]
    assert any(f"asked to cancel task '{tid}' via page" in line for line in audit), audit
