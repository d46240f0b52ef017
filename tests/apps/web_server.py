"""A real ``kew serve`` process for the web tests, on a free port."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from kew.testing.util import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
APP = "tests/apps/web_tasks.py:app"
MAX_BODY = 64 * 1024


class WebServer:
    """``kew serve`` of the test app with a 2-thread worker in the process;
    stop it with :meth:`stop` (by its pid)."""

    def __init__(self, directory: Path, *, worker: int = 2, url: str | None = None) -> None:
        self.dir = directory
        self.url = url or f"sqlite:///{directory / 'queues.sqlite3'}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = "admin-" + secrets.token_hex(16)
        self.read = "read-" + secrets.token_hex(16)
        self.log_path = directory / "server.log"
        self.worker = worker
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WebServer:
        env = {
            **os.environ,
            "KEW_WEB_TEST_DIR": str(self.dir),
            "KEW_WEB_TEST_URL": self.url,
            "KEW_WEB_ADMIN_TOKENS": self.admin,
            "KEW_WEB_READ_TOKENS": self.read,
            "KEW_WEB_MAX_BODY_BYTES": str(MAX_BODY),
        }
        cmd = [
            sys.executable,
            "-c",
            "from kew.cli import main; main()",
            "serve",
            APP,
            "--port",
            str(self.port),
            "--worker",
            str(self.worker),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for(self._up, 60, what=f"kew serve on port {self.port}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"kew serve exited {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, **kw)
