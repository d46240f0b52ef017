"""A ``kew serve`` process for an app on RabbitMQ whose URL has a password
(``amqp://guest:guest@...``), logging at DEBUG: a task is submitted over
HTTP, and /queues, /health and /metrics answer through the web's own
connection (tests/test_web_async.py checks, in-process, that the web
opened a connection of its own, ``kew.connect.connect_again``); the password
shows in no answer and nowhere in the process's log (kew's, uvicorn's,
pika's)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import kew
from kew.testing.util import free_port, port_open, require, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
URL = "amqp://guest:guest@127.0.0.1:5672/"
ADMIN = "admin-" + secrets.token_hex(16)


def test_a_password_in_the_broker_url_is_never_shown(tmp_path: Path) -> None:
    require(port_open("127.0.0.1", 5672), "RabbitMQ: nothing listens on 127.0.0.1:5672")
    sfx = f"-{secrets.token_hex(4)}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "SECRET_APP_URL": URL,
            "SECRET_APP_DIR": str(tmp_path),
            "SECRET_APP_SUFFIX": sfx,
            "KEW_WEB_ADMIN_TOKENS": ADMIN,
        }
    )
    cmd = [sys.executable, "-m", "kew.cli", "serve", "tests/apps/web_secret_app.py:app"]
    cmd += ["--port", str(port), "--log-level", "debug"]
    log_path = tmp_path / "serve.log"
    answers: list[str] = []
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as c:

            def healthy() -> httpx.Response | None:
                try:
                    r = c.get("/health")
                except httpx.TransportError:
                    return None
                return r if r.status_code == 200 else None

            health = wait_for(healthy, 60, what="kew serve up, the broker answering")
            r = c.post(f"/queues/secret.echo{sfx}/tasks", json={"n": 1})
            assert r.status_code == 202, r.text
            status = c.get(f"/tasks/{r.json()['id']}")
            assert status.json()["status"] == "queued"
            queues = c.get("/queues")
            assert {q["name"]: q for q in queues.json()}[f"secret.echo{sfx}"]["ready"] == 1
            metrics = c.get("/metrics")
            line = f'kew_queue_depth{{queue="secret.echo{sfx}",state="ready"}} 1.0'
            assert line in metrics.text.splitlines()
            answers += [health.text, status.text, queues.text, metrics.text, c.get("/").text]
    finally:
        proc.terminate()
        proc.wait(30)
        conn = kew.connect(URL)
        for name in (f"secret.echo{sfx}", f"secret.events{sfx}"):
            conn.delete(name)
        conn.close()
    logged = log_path.read_text()
    assert "pika" in logged and "kew: serving" in logged  # it logged, at DEBUG
    for text in [logged, *answers]:
        assert "guest:guest" not in text and ":guest@" not in text
