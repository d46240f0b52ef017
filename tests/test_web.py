"""The REST API end to end over HTTP against a real ``kew serve`` process
(SQLite queues and task store in a temp dir, a worker in the server)."""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import kew
from kew.qchan.spi import Message
from kew.testing.util import port_open, require, wait_for
from tests.apps.web_server import MAX_BODY, WebServer

pytestmark = pytest.mark.timeout(240)


REDIS_DB = "redis://127.0.0.1:6379/14"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebServer]:
    """The server on the embedded SQLite broker, and on the machine's Redis
    (under a key prefix of its own, deleted afterwards)."""
    url = None
    prefix = f"kew-webtest-{os.getpid()}-{secrets.token_hex(4)}"
    if request.param == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
        url = f"{REDIS_DB}?prefix={prefix}&lease=5"
    s = WebServer(tmp_path_factory.mktemp("web"), url=url).start()
    try:
        yield s
    finally:
        s.stop()
        if url is not None:
            import redis

            r = redis.Redis.from_url(REDIS_DB)
            for key in r.scan_iter(match=f"{prefix}:*"):
                r.delete(key)
            r.close()


@pytest.fixture(scope="module")
def admin(server: WebServer) -> Iterator[httpx.Client]:
    with server.client(server.admin) as c:
        yield c


@pytest.fixture(scope="module")
def reader(server: WebServer) -> Iterator[httpx.Client]:
    with server.client(server.read) as c:
        yield c


def _final(c: httpx.Client, task_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = c.get(f"/tasks/{task_id}")
        if r.status_code != 200:
            return None
        doc: dict[str, Any] = r.json()
        return doc if doc["status"] in ("succeeded", "failed") else None

    return wait_for(done, timeout, what=f"task {task_id} to finish")


def _raw_send(server: WebServer, queue: str, body: bytes) -> str:
    """Put a raw (possibly bad) message on a queue of the server's broker."""
    conn = kew.connect(server.url)
    try:
        p = conn.producer(queue)
        msg_id = "raw" + kew.qchan.new_id()[:20]
        p.send(Message(msg_id, body, {"content-type": "application/json"}))
        p.close()
        return msg_id
    finally:
        conn.close()


# -- happy paths ---------------------------------------------------------------------


def test_submit_then_status_and_output(server: WebServer, admin: httpx.Client) -> None:
    r = admin.post("/queues/thumbs/tasks", json={"image_id": 7, "size": 64})
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["status"] == "queued"
    assert doc["status_url"] == f"{server.base}/tasks/{doc['id']}"
    assert doc["output_url"] == f"{server.base}/tasks/{doc['id']}/output"
    assert r.headers["location"] == doc["status_url"]
    # The status URL answers at once (the server records the queued state itself).
    assert admin.get(doc["status_url"]).json()["status"] in ("queued", "running", "succeeded")

    final = _final(admin, doc["id"])
    assert final["status"] == "succeeded"
    assert final["queue"] == "thumbs"
    assert final["attempt"] >= 1

    out = admin.get(f"/tasks/{doc['id']}/output", params={"follow": "false"})
    assert out.status_code == 200
    assert out.headers["content-type"].startswith("text/plain")
    assert out.headers["cache-control"] == "no-cache"
    assert "rendering image 7 at 64px" in out.text
    assert "image 7 done" in out.text

    recent = admin.get("/tasks", params={"queue": "thumbs", "limit": 10}).json()
    assert doc["id"] in [t["id"] for t in recent]


def test_submit_with_a_delay(admin: httpx.Client) -> None:
    r = admin.post("/queues/thumbs/tasks", params={"delay": "3600"}, json={"image_id": 9})
    assert r.status_code == 202
    doc = admin.get(r.json()["status_url"]).json()
    assert doc["status"] == "queued"
    assert doc["next_at"] >= doc["created_at"] + 3_599_000
    queues = {q["name"]: q for q in admin.get("/queues").json()}
    assert queues["thumbs"]["delayed"] >= 1
    bad = admin.post("/queues/thumbs/tasks", params={"delay": "-1"}, json={"image_id": 9})
    assert bad.status_code == 400


def test_failed_task_reports_its_error(admin: httpx.Client) -> None:
    r = admin.post("/queues/thumbs/tasks", json={"image_id": 1, "note": "fail"})
    assert r.status_code == 202
    final = _final(admin, r.json()["id"])
    assert final["status"] == "failed"
    assert "told to fail" in final["last_error"]


def test_read_token_can_submit_and_read(reader: httpx.Client) -> None:
    r = reader.post("/queues/thumbs/tasks", json={"image_id": 2})
    assert r.status_code == 202
    assert _final(reader, r.json()["id"])["status"] == "succeeded"


def test_queues_lists_depths(admin: httpx.Client) -> None:
    r = admin.get("/queues")
    assert r.status_code == 200
    by_name = {q["name"]: q for q in r.json()}
    assert {"thumbs", "thumbs.outcomes", "slow", "kew.task-events"} <= set(by_name)
    assert by_name["thumbs"]["kind"] == "task"
    assert by_name["thumbs"]["type"] == "Thumbnail"
    assert by_name["thumbs.outcomes"]["kind"] == "outcomes"
    assert by_name["thumbs.outcomes"]["type"] == "Outcome[Thumbnail]"
    assert by_name["kew.task-events"]["kind"] == "events"
    for q in by_name.values():
        assert {"ready", "in_flight", "delayed", "dead"} <= set(q)


def test_health_without_token(server: WebServer) -> None:
    def seen() -> dict[str, Any] | None:
        doc: dict[str, Any] = httpx.get(f"{server.base}/health").json()
        return doc if doc["workers"] else None

    doc = wait_for(seen, 30, what="a worker heartbeat in /health")
    assert doc["status"] == "ok"
    assert doc["broker"] is True


def test_metrics(admin: httpx.Client) -> None:
    r = admin.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "kew_" in r.text


def test_openapi_document_has_the_task_types(admin: httpx.Client) -> None:
    doc = admin.get("/schema/openapi.json").json()
    body = doc["paths"]["/queues/thumbs/tasks"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/Thumbnail"
    thumb = doc["components"]["schemas"]["Thumbnail"]
    assert thumb["required"] == ["image_id"]
    assert "/tasks/{task_id}/output" in doc["paths"]
    assert "/health" in doc["paths"]


# -- streaming ------------------------------------------------------------------------


def test_output_follows_a_running_task(server: WebServer, admin: httpx.Client) -> None:
    r = admin.post("/queues/slow/tasks", json={"name": "follow-me"})
    task_id = r.json()["id"]
    received: list[str] = []
    finished = threading.Event()
    headers: dict[str, str] = {}

    def follow() -> None:
        with server.client(server.read) as c, c.stream("GET", f"/tasks/{task_id}/output") as s:
            headers.update(s.headers)
            for chunk in s.iter_text():
                received.append(chunk)
        finished.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    wait_for(lambda: "job follow-me started" in "".join(received), 30, what="first output line")
    # The task is still running (it waits for its release file), the stream still open.
    assert admin.get(f"/tasks/{task_id}").json()["status"] == "running"
    assert not finished.is_set()
    assert "released" not in "".join(received)

    (server.dir / "release-follow-me").touch()
    assert finished.wait(30), "the output stream did not end when the task finished"
    text = "".join(received)
    assert text.index("job follow-me started") < text.index("job follow-me released")
    assert headers["cache-control"] == "no-cache"
    assert headers["content-type"].startswith("text/plain")
    assert admin.get(f"/tasks/{task_id}").json()["status"] == "succeeded"


def test_output_follow_false_returns_at_once(server: WebServer, admin: httpx.Client) -> None:
    task_id = admin.post("/queues/slow/tasks", json={"name": "no-follow"}).json()["id"]
    wait_for(
        lambda: "started" in admin.get(f"/tasks/{task_id}/output?follow=0").text,
        30,
        what="output of the running task",
    )
    r = admin.get(f"/tasks/{task_id}/output", params={"follow": "0"})  # returns while running
    assert r.text == "job no-follow started\n"
    assert admin.get(f"/tasks/{task_id}").json()["status"] == "running"
    (server.dir / "release-no-follow").touch()
    assert _final(admin, task_id)["status"] == "succeeded"


# -- 4xx ----------------------------------------------------------------------------------


def test_body_not_json_is_400(admin: httpx.Client) -> None:
    r = admin.post(
        "/queues/thumbs/tasks",
        content=b"{image_id: 1",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    doc = r.json()
    assert doc["status_code"] == 400
    assert any("not valid JSON" in e for e in doc["extra"])


def test_wrong_shape_is_422_with_every_reason(admin: httpx.Client) -> None:
    r = admin.post(
        "/queues/thumbs/tasks",
        json={"size": "big", "formats": ["png", 3], "colour": "red"},
    )
    assert r.status_code == 422
    reasons = r.json()["extra"]
    assert "Object missing required field `image_id`" in reasons
    assert "Expected `int`, got `str` - at `$.size`" in reasons
    assert "Expected `str`, got `int` - at `$.formats[1]`" in reasons
    assert "Object contains unknown field `colour`" in reasons
    assert len(reasons) == 4


def test_not_an_object_is_422(admin: httpx.Client) -> None:
    r = admin.post("/queues/thumbs/tasks", json=[1, 2])
    assert r.status_code == 422
    assert r.json()["extra"] == ["Expected `object`, got `array`"]


def test_unknown_queue_is_404(admin: httpx.Client) -> None:
    r = admin.post("/queues/no-such-queue/tasks", json={"image_id": 1})
    assert r.status_code == 404
    assert "no-such-queue" in r.json()["detail"]
    assert admin.get("/queues/no-such-queue/dead").status_code == 404
    assert admin.post("/queues/no-such-queue/dead/purge").status_code == 404


def test_unknown_task_is_404(admin: httpx.Client) -> None:
    assert admin.get("/tasks/0123456789abcdef").status_code == 404
    assert admin.get("/tasks/0123456789abcdef/output").status_code == 404


def test_body_over_the_limit_is_413_and_nothing_is_queued(admin: httpx.Client) -> None:
    before = len(admin.get("/tasks", params={"limit": 1000}).json())
    big = {"image_id": 1, "note": "x" * (MAX_BODY + 10)}
    r = admin.post("/queues/thumbs/tasks", json=big)
    assert r.status_code == 413
    assert r.json()["status_code"] == 413
    assert len(admin.get("/tasks", params={"limit": 1000}).json()) == before


def test_bad_query_parameter_is_400(admin: httpx.Client) -> None:
    r = admin.get("/tasks", params={"limit": "0"})
    assert r.status_code == 400


# -- auth -----------------------------------------------------------------------------------

READ_ROUTES = [
    ("GET", "/queues"),
    ("GET", "/tasks"),
    ("GET", "/tasks/abc"),
    ("GET", "/tasks/abc/output"),
    ("GET", "/queues/thumbs/dead"),
    ("GET", "/metrics"),
    ("GET", "/schema/openapi.json"),
    ("POST", "/queues/thumbs/tasks"),
    ("POST", "/queues/thumbs/dead/requeue"),
    ("POST", "/queues/thumbs/dead/purge"),
]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", "Basic x"])
def test_every_route_but_health_needs_a_token(server: WebServer, token: str | None) -> None:
    for method, path in READ_ROUTES:
        headers = {}
        if token == "Basic x":
            headers["Authorization"] = "Basic eDp4"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        r = httpx.request(method, server.base + path, headers=headers, json={"image_id": 1})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(server.base + "/health").status_code == 200


def test_dead_letter_admin_routes_need_the_admin_scope(reader: httpx.Client) -> None:
    assert reader.post("/queues/thumbs/dead/requeue").status_code == 403
    assert reader.post("/queues/thumbs/dead/purge", json={"ids": ["x"]}).status_code == 403
    assert reader.get("/queues/thumbs/dead").status_code == 200


# -- dead letters --------------------------------------------------------------------------


def test_dead_letters_list_requeue_purge(server: WebServer, admin: httpx.Client) -> None:
    admin.post("/queues/thumbs/dead/purge")
    secret = "planted-secret-" + "7" * 8
    bad = msgspec.json.encode({"image_id": "not a number", "password": secret})
    msg_id = _raw_send(server, "thumbs", bad)

    def dead_ids() -> list[str]:
        return [d["id"] for d in admin.get("/queues/thumbs/dead").json()]

    wait_for(lambda: msg_id in dead_ids(), 30, what="the bad message to be dead-lettered")
    [d] = [d for d in admin.get("/queues/thumbs/dead").json() if d["id"] == msg_id]
    assert "cannot decode" in d["reason"]
    assert secret not in json.dumps(d)  # masked body
    assert json.loads(d["body"])["password"] == "***"
    queues = {q["name"]: q for q in admin.get("/queues").json()}
    assert queues["thumbs"]["dead"] >= 1

    assert admin.post("/queues/thumbs/dead/requeue", json={"ids": [msg_id]}).json() == {"count": 1}
    # It is consumed again, and dies again (still bad).
    wait_for(lambda: msg_id in dead_ids(), 30, what="the requeued message to die again")
    assert admin.post("/queues/thumbs/dead/purge", json={"ids": ["nope"]}).json() == {"count": 0}
    assert admin.post("/queues/thumbs/dead/purge", json={"ids": [msg_id]}).json() == {"count": 1}
    assert msg_id not in dead_ids()


def test_dead_letter_ids_body_is_validated(admin: httpx.Client) -> None:
    r = admin.post("/queues/thumbs/dead/purge", json={"ids": "all"})
    assert r.status_code == 422
    assert r.json()["extra"] == ["Expected `array | null`, got `str` - at `$.ids`"]
    r = admin.post(
        "/queues/thumbs/dead/purge", content=b"[", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


# -- the page's login (the page itself: test_web_page.py) ----------------------------------


def test_page_login_sets_a_session_cookie(server: WebServer) -> None:
    with httpx.Client(base_url=server.base) as c:
        r = c.get("/ui")
        assert r.status_code in (302, 303, 307)
        assert r.headers["location"].endswith("/ui/login")
        r = c.post("/ui/login", data={"token": "not-a-token-at-all"})
        assert r.status_code == 401
        assert "Unknown token" in r.text
        r = c.post("/ui/login", data={"token": server.read})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert server.read not in cookie
        page = c.get("/ui")
        assert page.status_code == 200
        assert "thumbs" in page.text and "kew.task-events" in page.text
        dead = c.get("/ui/queues/thumbs/dead")
        assert dead.status_code == 200 and "Dead letters of" in dead.text
        assert c.get("/ui/queues/nope/dead").status_code == 404
        assert c.get("/ui/overview").status_code == 200
        only_slow = c.get("/ui/overview", params={"queue": "slow"}).text
        assert "Recent tasks of" in only_slow
        assert '<td class="mono">thumbs</td>' not in only_slow.split("Recent tasks")[1]
        # A cookie authenticates reads; a write needs the session's CSRF token too.
        assert c.get("/queues").status_code == 200
        refused = c.post("/queues/thumbs/tasks", json={"image_id": 1})
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["detail"]
        csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]
        ok = c.post("/queues/thumbs/tasks", json={"image_id": 1}, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 202
        c.post("/ui/logout", data={"csrf": csrf})
        assert c.get("/queues").status_code == 401
        assert c.post("/queues/thumbs/tasks", json={"image_id": 1}).status_code == 401


# -- secrets --------------------------------------------------------------------------------


def test_tokens_never_in_the_server_log(server: WebServer, admin: httpx.Client) -> None:
    admin.get("/queues")
    httpx.get(server.base + "/queues", headers={"Authorization": "Bearer " + server.admin + "x"})
    log = server.log()
    assert "GET /queues" in log  # the access log is there ...
    assert server.admin not in log  # ... without the tokens
    assert server.read not in log
    assert "planted-secret" not in log


def test_start_up_without_tokens_is_refused(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEW_WEB_")}
    env["KEW_WEB_TEST_DIR"] = str(tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kew.cli import main; main()",
            "serve",
            "tests/apps/web_tasks.py:app",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "no API tokens configured" in r.stderr
