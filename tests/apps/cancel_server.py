"""A real ``kew serve`` process of tests/apps/cancel_app.py (a worker of 2
threads and the recorder in it), for the cancel tests over HTTP and in the
browser (tests/test_task_cancel.py, tests/test_web_cancel_page.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from kew.testing.util import wait_for
from tests.apps.web_server import ROOT, WebServer

APP = "tests/apps/cancel_app.py:app"


class CancelServer(WebServer):
    """``kew serve tests/apps/cancel_app.py:app --worker 2`` on SQLite in
    ``directory``; queue names without a suffix."""

    def start(self) -> CancelServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEW_", "CANCEL_APP_"))}
        env.update(
            {
                "CANCEL_APP_DIR": str(self.dir),
                "CANCEL_APP_URL": self.url,
                "KEW_WEB_ADMIN_TOKENS": self.admin,
                "KEW_WEB_READ_TOKENS": self.read,
            }
        )
        cmd = [sys.executable, "-c", "from kew.cli import main; main()", "serve", APP]
        cmd += ["--port", str(self.port), "--worker", str(self.worker)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for(self._up, 60, what=f"kew serve on port {self.port}")
        return self


def login(base: str, token: str) -> tuple[httpx.Client, str]:
    """A client logged in to the page at ``base``, and its CSRF token."""
    c = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
    page = c.post("/ui/login", data={"token": token})
    assert page.status_code == 200, page.text
    csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    return c, csrf
