"""The operators' console over HTTP: task filters, trends and workers in the
REST API (each behind the token), dead-letter actions with the page's
session and its CSRF token (a cross-site POST is refused), the audit log,
the server under a path prefix behind a reverse proxy, and the API
reference as HTML.  The page itself in a browser: test_web_console_page.py.

The kit at the top is shared with that module: a ``kew serve --root-path
/kew`` process (depths sampled every second) and a reverse proxy that
serves it under ``/kew/`` as nginx's ``location /kew/ { proxy_pass
http://127.0.0.1:PORT/; }`` would (prefix stripped), or passes the path as
it is (``strip=False``)."""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

import kew
from kew.qchan.spi import Message
from kew.testing.util import wait_for
from tests.apps.web_server import APP, MAX_BODY, ROOT, WebServer

PREFIX = "/kew"
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}


class ConsoleServer(WebServer):
    """``kew serve`` with ``--root-path`` and a config file (``sample_seconds = 1``)."""

    def __init__(self, directory: Path, *, root: str = PREFIX, **kw: Any) -> None:
        super().__init__(directory, **kw)
        self.root = root

    def start(self) -> ConsoleServer:
        config = self.dir / "web.toml"
        config.write_text('[web]\nsample_seconds = 1\ntitle = "kew console"\n')
        env = {
            **os.environ,
            "KEW_WEB_TEST_DIR": str(self.dir),
            "KEW_WEB_TEST_URL": self.url,
            "KEW_WEB_ADMIN_TOKENS": self.admin,
            "KEW_WEB_READ_TOKENS": self.read,
            "KEW_WEB_MAX_BODY_BYTES": str(MAX_BODY),
        }
        cmd = [sys.executable, "-c", "from kew.cli import main; main()", "serve", APP]
        cmd += ["--port", str(self.port), "--worker", str(self.worker), "--config", str(config)]
        cmd += ["--root-path", self.root]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for(self._up, 60, what=f"kew serve on port {self.port}")
        return self


class PrefixProxy:
    """A threaded HTTP reverse proxy on a free port: ``PREFIX/...`` goes to
    the upstream (prefix stripped unless ``strip=False``); anything else is
    404.  Responses stream through (a followed task output too)."""

    def __init__(self, upstream_port: int, *, strip: bool = True) -> None:
        self.upstream_port = upstream_port
        self.strip = strip
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy.seen.append(f"{self.command} {self.path}")
                if not (self.path == PREFIX or self.path.startswith(PREFIX + "/")):
                    self.send_error(404, "outside the proxied prefix")
                    return
                path = (self.path[len(PREFIX) :] or "/") if proxy.strip else self.path
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["X-Forwarded-Prefix"] = PREFIX
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    conn.request(self.command, path, body, headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while chunk := resp.read1(65536):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    conn.close()

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> PrefixProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def raw_send(server: WebServer, queue: str, body: bytes) -> str:
    """Put a raw (bad) message on a queue of the server's broker; its id."""
    conn = kew.connect(server.url)
    try:
        p = conn.producer(queue)
        msg_id = "raw" + kew.qchan.new_id()[:20]
        p.send(Message(msg_id, body, {"content-type": "application/json"}))
        p.close()
        return msg_id
    finally:
        conn.close()


def dead_ids(api: httpx.Client, queue: str = "thumbs") -> list[str]:
    return [d["id"] for d in api.get(f"/queues/{queue}/dead", params={"limit": 1000}).json()]


def make_dead(server: WebServer, api: httpx.Client, n: int) -> list[str]:
    """``n`` dead letters on ``thumbs`` (bodies the task type refuses)."""
    ids = [raw_send(server, "thumbs", b'{"image_id": "not a number"}') for _ in range(n)]
    wait_for(lambda: set(ids) <= set(dead_ids(api)), 30, what=f"{n} dead letters")
    return ids


def final(api: httpx.Client, task_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = api.get(f"/tasks/{task_id}").json()
        return doc if doc.get("status") in ("succeeded", "failed") else None

    found = wait_for(done, 30, what=f"task {task_id} to finish")
    assert found is not None
    return found


def login(base: str, token: str) -> tuple[httpx.Client, str]:
    """A client logged in to the page at ``base`` (with the prefix), and its CSRF token."""
    c = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
    page = c.post(f"{PREFIX}/ui/login", data={"token": token})
    assert page.status_code == 200, page.text
    csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    return c, csrf


# -- the tests -----------------------------------------------------------------------------


pytestmark = pytest.mark.timeout(240)

ADMIN_NAME = "KEW_WEB_ADMIN_TOKENS[0]"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    s = ConsoleServer(tmp_path_factory.mktemp("console")).start()
    try:
        yield s
    finally:
        (s.dir / "release-all").touch()
        s.stop()


@pytest.fixture(scope="module")
def admin(server: ConsoleServer) -> Iterator[httpx.Client]:
    with server.client(server.admin) as c:
        yield c


@pytest.fixture(scope="module")
def proxy(server: ConsoleServer) -> Iterator[PrefixProxy]:
    p = PrefixProxy(server.port).start()
    try:
        yield p
    finally:
        p.stop()


def _ids(api: httpx.Client, **params: Any) -> list[str]:
    r = api.get("/tasks", params=params)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()]


def _running(api: httpx.Client, name: str) -> str:
    task_id: str = api.post("/queues/slow/tasks", json={"name": name}).json()["id"]
    wait_for(
        lambda: api.get(f"/tasks/{task_id}").json()["status"] == "running",
        30,
        what=f"slow task {name} to run",
    )
    return task_id


def test_tasks_filters_in_the_rest_api(server: ConsoleServer, admin: httpx.Client) -> None:
    ok = [admin.post("/queues/thumbs/tasks", json={"image_id": i}).json()["id"] for i in (1, 2)]
    bad = admin.post("/queues/thumbs/tasks", json={"image_id": 3, "note": "fail"}).json()["id"]
    for t in [*ok, bad]:
        final(admin, t)
    held = _running(admin, "filters")
    try:
        failed = _ids(admin, status="failed")
        assert bad in failed and not set(ok) & set(failed)
        assert set(ok) <= set(_ids(admin, status="succeeded", queue="thumbs"))
        assert held in _ids(admin, status="running", queue="slow")
        assert held not in _ids(admin, status="running", queue="thumbs")
        both = _ids(admin, status=["failed", "running"], queue=["thumbs", "slow"])
        assert {bad, held} <= set(both) and not set(ok) & set(both)
        assert bad in _ids(admin, error="TOLD TO FAIL")  # any case
        assert not set(ok) & set(_ids(admin, error="told to"))
        now = dt.datetime.now(dt.UTC)
        assert _ids(admin, since=(now + dt.timedelta(hours=1)).isoformat()) == []
        window = {"since": (now - dt.timedelta(minutes=10)).isoformat(), "until": now.isoformat()}
        assert {*ok, bad} <= set(_ids(admin, **window))
        assert _ids(admin, until="2000-01-01T00:00:00") == []  # no offset: UTC
        worker = admin.get(f"/tasks/{held}").json()["worker"]
        assert held in _ids(admin, worker=worker)
        first, second = _ids(admin, limit=2), _ids(admin, limit=2, offset=2)
        assert len(first) == len(second) == 2 and first + second == _ids(admin, limit=4)
        for bad_params in (
            {"status": "nope"},
            {"since": "yesterday"},
            {"limit": 0},
            {"offset": -1},
            {"error": "x" * 501},
        ):
            assert admin.get("/tasks", params=bad_params).status_code == 400, bad_params
    finally:
        (server.dir / "release-filters").touch()
    assert final(admin, held)["status"] == "succeeded"


def test_trends_and_workers_in_the_rest_api(server: ConsoleServer, admin: httpx.Client) -> None:
    done = admin.post("/queues/thumbs/tasks", json={"image_id": 50}).json()["id"]
    final(admin, done)

    def trends() -> dict[str, Any] | None:
        doc: dict[str, Any] = admin.get("/stats", params={"minutes": 30}).json()
        every = doc["tasks"][0]
        started = sum(p["started"] for p in every["points"])
        summed = doc["depth"][0]["points"]
        return doc if every["queue"] == "*" and started >= 1 and len(summed) >= 2 else None

    doc = wait_for(trends, 30, what="task counts and two depth samples in /stats")
    assert doc is not None
    assert doc["bucket_seconds"] == 60 and doc["sample_seconds"] == 1
    assert len(doc["tasks"][0]["points"]) == 30
    assert {s["queue"] for s in doc["depth"]} >= {"*", "thumbs", "slow", "kew.task-events"}
    assert {s["queue"] for s in doc["tasks"]} == {"*", "thumbs", "slow"}
    thumbs = admin.get("/stats", params={"queue": "thumbs"}).json()
    assert [s["queue"] for s in thumbs["tasks"]] == ["thumbs"]
    assert sum(p["succeeded"] for p in thumbs["tasks"][0]["points"]) >= 1
    assert admin.get("/stats", params={"queue": "nope"}).status_code == 404
    assert admin.get("/stats", params={"minutes": 4}).status_code == 400

    held = _running(admin, "workers")
    try:

        def ours() -> dict[str, Any] | None:
            for w in admin.get("/workers").json():
                if w["alive"] and any(t["id"] == held for t in w["running"]):
                    return dict(w)
            return None

        w = wait_for(ours, 30, what="the server's worker, alive, running the held task")
        assert w is not None
        assert w["concurrency"] == 2  # kew serve --worker 2
        assert {"thumbs", "slow"} <= set(w["queues"])
        assert w["last_seen"] > 0
    finally:
        (server.dir / "release-workers").touch()


ROUTES = ["/stats", "/workers", "/tasks?status=failed&error=x", "/schema", "/schema/swagger"]


@pytest.mark.parametrize("path", ROUTES)
def test_new_routes_need_the_token(server: ConsoleServer, path: str) -> None:
    for prefix in ("", PREFIX):
        r = httpx.get(server.base + prefix + path)
        assert r.status_code == 401, (prefix, path)
        assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.get(server.base + prefix + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(
            server.base + prefix + path, headers={"Authorization": f"Bearer {server.read}"}
        )
        assert ok.status_code == 200, (prefix, path, ok.text)


def test_cookie_writes_need_the_csrf_token(server: ConsoleServer, admin: httpx.Client) -> None:
    [victim] = make_dead(server, admin, 1)
    c, csrf = login(server.base, server.admin)
    with closing(c):
        evil = {"Origin": "http://evil.example", "Referer": "http://evil.example/x"}
        # A cross-site form or fetch carries the cookie but cannot know the token.
        api = c.post(f"{PREFIX}/queues/thumbs/dead/purge", headers=evil)
        assert api.status_code == 403 and "CSRF" in api.json()["detail"]
        form = {"confirm": "yes", "all": "yes"}
        assert c.post(f"{PREFIX}/ui/queues/thumbs/dead/purge", data=form).status_code == 403
        wrong = {**form, "csrf": csrf[:-2] + "xx"}
        assert c.post(f"{PREFIX}/ui/queues/thumbs/dead/purge", data=wrong).status_code == 403
        ask = {"action": "purge-all"}
        assert c.post(f"{PREFIX}/ui/queues/thumbs/dead/confirm", data=ask).status_code == 403
        assert c.post(f"{PREFIX}/queues/thumbs/tasks", json={"image_id": 1}).status_code == 403
        assert victim in dead_ids(admin)  # nothing was done
        # With the token, the page's own form works (and says what it did).
        page = c.post(
            f"{PREFIX}/ui/queues/thumbs/dead/purge",
            data={"confirm": "yes", "ids": victim, "csrf": csrf},
        )
        assert page.status_code == 200 and str(page.url).endswith("done=purge&count=1")
        assert "Purged 1 dead letter." in page.text
        assert victim not in dead_ids(admin)
        # The header works too, for scripts on the page.
        r = c.post(
            f"{PREFIX}/queues/thumbs/dead/purge",
            json={"ids": ["x"]},
            headers={"X-CSRF-Token": csrf},
        )
        assert r.json() == {"count": 0}
        # Logging out is a write too: another site cannot log the visitor out.
        assert c.post(f"{PREFIX}/ui/logout").status_code == 403
        assert c.get(f"{PREFIX}/queues").status_code == 200
        c.post(f"{PREFIX}/ui/logout", data={"csrf": csrf})
        assert c.get(f"{PREFIX}/queues").status_code == 401
    reader, read_csrf = login(server.base, server.read)
    with closing(reader):
        r = reader.post(
            f"{PREFIX}/ui/queues/thumbs/dead/purge",
            data={"confirm": "yes", "all": "yes", "csrf": read_csrf},
        )
        assert r.status_code == 403  # a read session cannot act, CSRF token or not
        assert 'name="action"' not in reader.get(f"{PREFIX}/ui/queues/thumbs/dead").text


def test_actions_are_audited_without_tokens(server: ConsoleServer, admin: httpx.Client) -> None:
    one, two = make_dead(server, admin, 2)
    assert admin.post("/queues/thumbs/dead/requeue", json={"ids": [one]}).json() == {"count": 1}
    wait_for(lambda: one in dead_ids(admin), 30, what="the requeued letter to die again")
    c, csrf = login(server.base, server.admin)
    with closing(c):
        r = c.post(
            f"{PREFIX}/ui/queues/thumbs/dead/purge",
            data={"confirm": "yes", "ids": [one, two], "csrf": csrf},
        )
        assert "Purged 2 dead letters." in r.text
    log = server.log()
    audit = [line for line in log.splitlines() if "kew.web.audit" in line]
    assert audit and all(line.startswith("INFO") for line in audit)  # at INFO
    api = f"token '{ADMIN_NAME}' (admin) requeued 1 dead letter(s) of 'thumbs'"
    assert any(f"audit: {api} (asked: ['{one}']) via API" in line for line in audit)
    page = f"page session of token '{ADMIN_NAME}' (admin) purged 2 dead letter(s) of 'thumbs'"
    assert any(f"audit: {page} (asked: ['{one}', '{two}']) via page" in x for x in audit)
    assert any(f"audit: page login with token '{ADMIN_NAME}' (admin)" in x for x in audit)
    assert server.admin not in log and server.read not in log


def _links(html: str) -> list[str]:
    return re.findall(r'(?:href|action|src)="([^"#]*)"', html)


def test_served_under_a_prefix_behind_a_proxy(server: ConsoleServer, proxy: PrefixProxy) -> None:
    # The proxy serves only /kew/...; the server's own links must all stay there.
    with httpx.Client(base_url=proxy.base, timeout=30, follow_redirects=True) as c:
        r = c.get(f"{PREFIX}/")
        assert str(r.url) == f"{proxy.base}{PREFIX}/ui/login"
        assert c.get("/ui").status_code == 404  # outside the prefix: not proxied
    c, _ = login(proxy.base, server.admin)
    with closing(c):
        for page in ("/ui", "/ui/charts", "/ui/workers", "/ui/api", "/ui/queues/thumbs/dead"):
            html = c.get(PREFIX + page).text
            links = [u for u in _links(html) if u]
            assert links, page
            outside = [u for u in links if not u.startswith(f"{PREFIX}/")]
            assert outside == [], (page, outside)
            assert 'data-root="/kew"' in html
        assert "Set-Cookie" not in c.get(f"{PREFIX}/ui").headers
        cookie = c.cookies.jar
        assert [k.path for k in cookie] == [f"{PREFIX}/"]
    bearer = {"Authorization": f"Bearer {server.admin}"}
    with httpx.Client(base_url=proxy.base, headers=bearer, timeout=30) as api:
        sub = api.post(f"{PREFIX}/queues/thumbs/tasks", json={"image_id": 77}).json()
        assert sub["status_url"] == f"{proxy.base}{PREFIX}/tasks/{sub['id']}"
        wait_for(lambda: api.get(sub["status_url"]).json()["status"] == "succeeded", 30)
        assert "image 77 done" in api.get(sub["output_url"]).text  # streamed through
        doc = api.get(f"{PREFIX}/schema/openapi.json").json()
        assert doc["servers"] == [{"url": PREFIX}]
    # A proxy that passes the prefix on (no stripping) works the same.
    keep = PrefixProxy(server.port, strip=False).start()
    try:
        c2, _ = login(keep.base, server.read)
        with closing(c2):
            assert "kew.task-events" in c2.get(f"{PREFIX}/ui").text
            assert any(s.startswith("GET /kew/ui") for s in keep.seen)
    finally:
        keep.stop()


def test_api_reference_is_readable_offline_html(server: ConsoleServer, admin: httpx.Client) -> None:
    for path in ("/schema", "/schema/swagger", f"{PREFIX}/schema/docs"):
        r = admin.get(path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        html = r.text
        assert "Submit a task to thumbs" in html
        assert '<span class="method m-GET">GET</span><code class="wrap">/tasks</code>' in html
        assert '<table class="params">' in html
        for name in ("status", "since", "until", "error", "offset", "minutes"):
            assert f'<td class="mono">{name}' in html, name
        assert 'id="schema-Thumbnail"' in html and 'id="schema-TaskRecord"' in html
        assert "<script" not in html  # nothing to load: works offline
        assert "http://" not in html.replace(server.base, "") and "https://" not in html
    c, _ = login(server.base, server.read)
    with closing(c):
        page = c.get(f"{PREFIX}/ui/api")
        assert page.status_code == 200 and "Submit a task to thumbs" in page.text
