"""The operators' console in headless Chromium (Debian's ``chromium``
driven by Playwright with ``executable_path``), served under ``/kew/``
behind a reverse proxy: log in, see the trends with data, search tasks,
requeue one dead letter and purge the others (selected, then all) through
the confirmation page, follow a task's output, the workers, charts and API
pages; at 1280 and 400 px wide (no horizontal overflow at 400); every
request the browser makes stays on this host and under the prefix.

Screenshots go to a temporary directory (``$KEW_SCREENSHOT_DIR`` if set),
printed by the test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from kew.testing.util import require, wait_for
from tests.test_web_console import (
    PREFIX,
    ConsoleServer,
    PrefixProxy,
    dead_ids,
    final,
    make_dead,
)

pytestmark = pytest.mark.timeout(300)

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
LOCAL = ("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    s = ConsoleServer(tmp_path_factory.mktemp("consolepage")).start()
    try:
        yield s
    finally:
        (s.dir / "release-all").touch()
        s.stop()


@pytest.fixture(scope="module")
def proxy(server: ConsoleServer) -> Iterator[PrefixProxy]:
    p = PrefixProxy(server.port).start()
    try:
        yield p
    finally:
        p.stop()


def _shots() -> Path:
    where = os.environ.get("KEW_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="console-", dir=where))
    return Path(tempfile.mkdtemp(prefix="kew-console-shots-"))


def test_console_in_chromium(
    server: ConsoleServer, proxy: PrefixProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    require(
        Path(CHROMIUM).exists() or shutil.which("chromium") is not None,
        f"no chromium at {CHROMIUM} (scripts/install-test-tools installs it)",
    )
    sync_api = pytest.importorskip("playwright.sync_api")
    with closing(server.client(server.admin)) as api:
        ok = [api.post("/queues/thumbs/tasks", json={"image_id": i}).json()["id"] for i in (5, 6)]
        bad = api.post("/queues/thumbs/tasks", json={"image_id": 7, "note": "fail"}).json()["id"]
        for t in [*ok, bad]:
            final(api, t)
        dead = make_dead(server, api, 4)

        shots = _shots()
        requested: list[str] = []
        foreign: list[str] = []
        base = f"{proxy.base}{PREFIX}"

        def only_local(route: Any) -> None:
            url = route.request.url
            requested.append(url)
            if urlsplit(url).hostname in LOCAL:
                route.continue_()
            else:
                foreign.append(url)
                route.abort()

        overflow: dict[str, int] = {}

        def fits(page: Any, name: str) -> None:
            """Screenshots of this page at 1280 and 400 px; note overflow at 400."""
            for width in (1280, 400):
                page.set_viewport_size({"width": width, "height": 860})
                if width == 400 and page.evaluate("document.documentElement.scrollWidth") > 400:
                    overflow[name] = page.evaluate("document.documentElement.scrollWidth")
                page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 860})

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                ctx = browser.new_context(viewport={"width": 1280, "height": 860})
                ctx.route("**/*", only_local)
                page = ctx.new_page()
                page.goto(f"{base}/ui")
                assert page.url == f"{base}/ui/login"
                page.fill("#token", server.admin)
                page.click("button[type=submit]")
                page.wait_for_selector("#queues")

                # Trends: the tasks that ran are on the chart.
                chart = page.locator('#trends figure[data-kind="tasks"]')
                assert int(chart.get_attribute("data-total") or 0) >= 6
                line = chart.locator('polyline[data-series="succeeded"]')
                assert len((line.get_attribute("points") or "").split()) >= 60
                assert int(chart.locator('b[data-series="failed"]').inner_text()) >= 1

                # Search: failed tasks only.
                page.select_option("#f-status", "failed")
                page.fill("#f-error", "TOLD")
                page.click("#f-apply")
                page.wait_for_url("**status=failed**")
                badges = page.locator("#tasks tbody .badge").all_inner_texts()
                assert badges and set(badges) == {"failed"}
                assert page.locator(f'#tasks tr[data-task="{bad}"]').count() == 1
                assert page.locator(f'#tasks tr[data-task="{ok[0]}"]').count() == 0

                # Dead letters: requeue one, with the confirmation step.
                page.goto(f"{base}/ui")
                page.click('tr[data-queue="thumbs"] a.dead-some')
                page.wait_for_selector("#dead")
                fits(page, "dead-letters")
                page.click(f'tr[data-dead="{dead[0]}"] button[value="requeue:{dead[0]}"]')
                page.wait_for_selector("#confirm")
                assert dead[0] in page.inner_text("#confirm")
                assert dead[0] in dead_ids(api)  # nothing done before confirming
                page.click("#confirm-yes")
                page.wait_for_selector("#flash")
                assert page.inner_text("#flash") == "Requeued 1 dead letter."
                # It is consumed again and dies again (still a bad body).
                wait_for(lambda: dead[0] in dead_ids(api), 30, what="the requeued letter back")

                # Purge two selected ones, then all the rest.
                page.goto(f"{base}/ui/queues/thumbs/dead")
                page.check(f'input[name="ids"][value="{dead[1]}"]')
                page.check(f'input[name="ids"][value="{dead[2]}"]')
                page.click("#purge-selected")
                page.wait_for_selector("#confirm")
                fits(page, "confirm")
                listed = page.inner_text("#confirm")
                assert dead[1] in listed and dead[2] in listed and dead[3] not in listed
                page.click("#confirm-yes")
                page.wait_for_selector("#flash")
                assert page.inner_text("#flash") == "Purged 2 dead letters."
                left = dead_ids(api)  # the failed task's message is a dead letter too
                assert {dead[0], dead[3]} <= set(left) and not {dead[1], dead[2]} & set(left)
                page.click("#purge-all")
                page.wait_for_selector("#confirm")
                assert "every dead letter" in page.inner_text("#confirm")
                page.click("#confirm-yes")
                page.wait_for_selector("#flash")
                assert page.inner_text("#flash") == f"Purged {len(left)} dead letters."
                assert "No dead letters." in page.inner_text("#dead")
                assert dead_ids(api) == []

                # A task's page under the prefix follows its output.
                page.goto(f"{base}/ui/tasks/{ok[0]}")
                page.wait_for_function(
                    "document.getElementById('output').textContent.includes('image 5 done')"
                )
                page.click("header nav >> text=Workers")
                page.wait_for_selector("#workers")
                assert "alive" in page.inner_text("#workers tbody")
                page.click("header nav >> text=Charts")
                thumbs = page.locator('[data-chart-queue="thumbs"] figure[data-kind="tasks"]')
                assert int(thumbs.get_attribute("data-total") or 0) >= 6
                page.click("header nav >> text=API")
                page.wait_for_selector("#schemas")
                assert "Submit a task to thumbs" in page.inner_text("main")

                # Two widths; at 400 px nothing spills sideways.
                views = {
                    "overview": "/ui",
                    "dead": "/ui/queues/thumbs/dead",
                    "task": f"/ui/tasks/{bad}",
                    "workers": "/ui/workers",
                    "charts": "/ui/charts",
                    "api": "/ui/api",
                }
                for name, path in views.items():
                    page.goto(base + path)
                    page.wait_for_selector("main h1")
                    fits(page, name)
                assert overflow == {}, f"wider than 400 px: {overflow}"
            finally:
                browser.close()

    assert foreign == [], f"requests left the host: {foreign}"
    assert requested and all(u.startswith(f"{base}/") for u in requested), [
        u for u in requested if not u.startswith(f"{base}/")
    ]
    assert (shots / "overview-1280.png").stat().st_size > 10_000
    assert (shots / "overview-400.png").stat().st_size > 5_000
    with capsys.disabled():  # shown even when output is captured
        print(f"\nconsole screenshots (1280 and 400 px): {shots}")
