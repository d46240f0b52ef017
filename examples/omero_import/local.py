"""The whole service on one machine, in one process: for the demo and tests.

A loopback SMTP sink, the service with its workers, and the HTTP front end
served by uvicorn on a free port; the stand-in importer instead of
``omero`` (its argv lines go to ``<workdir>/omero-calls.jsonl``).  Nothing
is mocked: messages go through the configured broker (the embedded SQLite
default, or any URL), e-mail through a real SMTP conversation, requests
through real HTTP.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec

from kew.testing.util import free_port, wait_for

from .config import Config, load_config
from .service import OmeroImportService
from .smtp_sink import SmtpSink

FAKE_OMERO = str(Path(__file__).resolve().parent / "fake_omero.py")


def stand_in_settings(workdir: Path, *, smtp_port: int, web_port: int) -> dict[str, Any]:
    """Configuration overrides that run everything locally with short intervals."""
    fake = [sys.executable, FAKE_OMERO]
    return {
        "import": {
            "command": [*fake, "import"],
            "retry_minutes": [0.01, 0.01],  # 0.6 s: three attempts at most
            "timeout": 60,
            "concurrency": 3,
            "env": {
                "FAKE_OMERO_LOG": str(workdir / "omero-calls.jsonl"),
                "FAKE_OMERO_DELAY": "0.02",
            },
            "mount_points": {"file://scope-3/data/": str(workdir / "scope-3")},
        },
        "session": {
            "keepalive_command": [*fake, "sessions", "keepalive"],
            "close_command": [*fake, "sessions", "logout"],
            "interval": 0.4,
        },
        "mail": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "security": "none",
            "sender": "omero-import@facility.example",
            "admin": "omero-admin@facility.example",
            "retry_minutes": [0.01, 0.05],
        },
        "web": {"host": "127.0.0.1", "port": web_port},
        "kew": {"store": f"sqlite:///{workdir / 'kew-tasks.sqlite3'}"},
    }


class LocalStack:
    def __init__(
        self,
        workdir: Path,
        *,
        settings: dict[str, dict[str, Any]] | None = None,
        worker_concurrency: int = 4,
    ) -> None:
        self.workdir = workdir
        self.calls_log = workdir / "omero-calls.jsonl"
        self.smtp = SmtpSink()
        self.web_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.web_port}"
        self.admin_token = secrets.token_urlsafe(24)
        merged = stand_in_settings(workdir, smtp_port=self.smtp.port, web_port=self.web_port)
        merged["web"]["tokens"] = {self.admin_token: "admin"}
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        self.config: Config = load_config(env={}, overrides=merged)
        self._worker_concurrency = worker_concurrency
        self.service: OmeroImportService | None = None
        self._worker: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalStack:
        import uvicorn

        from .web import create_web

        self.smtp.start()
        svc = self.service = OmeroImportService(self.config)
        self._worker = svc.app.worker(concurrency=self._worker_concurrency, record=True)
        self._worker.start()
        app = create_web(svc, base_url=self.base_url)
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.web_port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, name="omero-web", daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, 30, what="the web server to start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._worker is not None:
            self._worker.stop(10)
        if self.service is not None:
            self.service.close()
        self.smtp.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def calls(self) -> list[list[str]]:
        """Every argv the stand-in importer was run with, in order."""
        if not self.calls_log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.calls_log.read_text().splitlines()]


def request(target: str, *, session_key: str = "demo-session-key-0001", **extra: Any) -> Any:
    """An import request as a Smuggler client sends it (strings everywhere)."""
    return {
        "experimenterEmail": "ann@facility.example",
        "targetUri": target,
        "omeroHost": "omero.facility.example",
        "omeroPort": "4064",
        "sessionKey": session_key,
        "datasetId": "12",
        **extra,
    }


def dumps(value: Any) -> bytes:
    return msgspec.json.encode(value)
