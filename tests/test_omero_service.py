"""OMERO import example end to end: HTTP in, the stand-in importer run as a
subprocess with the exact command lines, retries, the outcome e-mails over
real SMTP, the session keep-alive stopping when the batch ends; on the
embedded SQLite broker and on the machine's Redis."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.omero_import.batches import report_key
from examples.omero_import.config import ConfigError, load_config
from examples.omero_import.local import LocalStack, request
from examples.omero_import.request import ImportTask
from examples.omero_import.smtp_sink import text_of
from kew.qchan import new_id
from kew.qchan.spi import QueueStats, now_ms
from kew.qchan.spi.dedupe import ClaimResult
from kew.task.model import Outcome
from kew.testing.util import port_open, require, wait_for

KEY = "s3cr3t-session-key-42"
TARGETS = {
    "ok": "file://scope-3/data/acq/plate-ok.tif",
    "once": "file://scope-3/data/acq/plate-fail-once.tif",
    "always": "acq/plate-fail-always.tif",  # a relative local path, as Smuggler clients send
}


def _broker_url(kind: str, tmp_path: Path, tag: str) -> str:
    """The broker of a test; its batch bookkeeping is on the same backend."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'kew.sqlite3'}"
    require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
    return f"redis://127.0.0.1:6379/0?prefix=omero-{tag}"


def _clean(stack: LocalStack) -> None:
    """Leave nothing on the shared Redis: queues, dead letters, idempotency records."""
    assert stack.service is not None
    conn: Any = stack.service.app.connector
    if hasattr(conn, "redis"):
        for k in conn.redis.scan_iter(f"{conn.options.prefix}:*"):
            conn.redis.delete(k)


@pytest.fixture(params=["sqlite", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalStack]:
    tag = new_id()[:12]
    settings: dict[str, dict[str, object]] = {
        "import": {"queue": f"omero.import.{tag}", "relative_root": str(tmp_path / "rel")},
        "session": {"queue": f"omero.keepalive.{tag}"},
        "mail": {"queue": f"kew.mail.{tag}"},
        "kew": {"events_queue": f"kew.task-events.{tag}", "encryption_keys": _key()},
    }
    settings["kew"]["url"] = _broker_url(str(request.param), tmp_path, tag)
    with LocalStack(tmp_path, settings=settings) as s:
        yield s
        _clean(s)


def _key() -> str:
    from kew.qchan.crypto import new_key

    return f"k1:{new_key()}"


def _empty(s: QueueStats) -> bool:
    return s.ready == s.in_flight == s.delayed == 0


def _imports(calls: list[list[str]], target_end: str) -> list[list[str]]:
    return [c for c in calls if c[0] == "import" and c[-1].endswith(target_end)]


def test_batch_of_three(stack: LocalStack, tmp_path: Path) -> None:
    batch = [
        request(TARGETS["ok"], session_key=KEY, name="plate ok", description="first plate"),
        request(
            TARGETS["once"],
            session_key=KEY,
            textAnnotations=[["org.example/run", "run 7"]],
            annotationIds=["31", "32"],
        ),
        request(TARGETS["always"], session_key=KEY, datasetId="", screenId="5"),
    ]
    r = httpx.post(f"{stack.base_url}/ome/import", json=batch, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [a["targetUri"] for a in answer] == list(TARGETS.values())
    for a in answer:
        assert a["statusUri"].startswith(f"{stack.base_url}/ome/import/")

    # one e-mail to the experimenter, one to the administrator, once the batch is done
    mails = stack.smtp.wait(2, 90)
    by_to = {str(m["To"]): m for m in mails}
    assert set(by_to) == {"ann@facility.example", "omero-admin@facility.example"}
    ann = text_of(by_to["ann@facility.example"])
    admin = text_of(by_to["omero-admin@facility.example"])
    assert "2 imported, 1 failed" in str(by_to["ann@facility.example"]["Subject"])
    assert TARGETS["ok"] in ann and TARGETS["once"] in ann and TARGETS["always"] in ann
    assert ann.index(TARGETS["always"]) > ann.index("Failed (1)") > ann.index(TARGETS["once"])
    assert TARGETS["always"] in admin and TARGETS["ok"] not in admin
    assert KEY not in ann and KEY not in admin

    # statuses and logs through the status URIs
    def final() -> dict[str, dict[str, Any]] | None:
        docs = {
            a["targetUri"]: httpx.get(a["statusUri"], params={"format": "json"}).json()
            for a in answer
        }
        return (
            docs if all(d.get("status") in ("succeeded", "failed") for d in docs.values()) else None
        )

    status = wait_for(final, 30, what="final statuses")
    assert status is not None
    assert {t: (d["status"], d["attempt"]) for t, d in status.items()} == {
        TARGETS["ok"]: ("succeeded", 1),
        TARGETS["once"]: ("succeeded", 2),
        TARGETS["always"]: ("failed", 3),
    }
    text = httpx.get(answer[0]["statusUri"])
    assert text.headers["X-Kew-Status"] == "succeeded"
    assert text.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "IMPORT_DONE Imported file:" in text.text
    assert "stand-in failure" in status[TARGETS["once"]]["output"]
    for d in status.values():
        assert KEY not in d["output"] and KEY not in d.get("lastError", "")

    # the exact importer command lines (the stand-in records its argv)
    scope = str(tmp_path / "scope-3")
    session = ["-s", "omero.facility.example", "-p", "4064", "-k", KEY]
    calls = stack.calls()
    assert _imports(calls, "plate-ok.tif") == [
        ["import", *session, "-n", "plate ok", "-x", "first plate", "-d", "12",
         f"{scope}/acq/plate-ok.tif"]
    ]  # fmt: skip
    assert _imports(calls, "plate-fail-once.tif") == 2 * [
        ["import", *session, "-d", "12", "--annotation-ns", "org.example/run",
         "--annotation-text", "run 7", "--annotation-link", "31", "--annotation-link", "32",
         f"{scope}/acq/plate-fail-once.tif"]
    ]  # fmt: skip
    assert _imports(calls, "plate-fail-always.tif") == 3 * [
        ["import", *session, "-r", "5", str(tmp_path / "rel" / "acq" / "plate-fail-always.tif")]
    ]

    # the session was kept alive while the batch ran, then closed once; no ping after
    svc = stack.service
    assert svc is not None and svc.keepalive is not None
    wait_for(lambda: ["sessions", "logout", *session] in stack.calls(), 30, what="session close")
    ka = svc.keepalive.browser()
    wait_for(lambda: _empty(ka.stats()), 30, what="an empty keep-alive queue")
    calls = stack.calls()
    sessions = [c for c in calls if c[0] == "sessions"]
    assert sessions.count(["sessions", "logout", *session]) == 1
    assert sessions[-1] == ["sessions", "logout", *session]
    assert sessions.count(["sessions", "keepalive", *session]) >= 1
    assert len(sessions) == sessions.count(["sessions", "keepalive", *session]) + 1

    # reported once: the mail queue is drained and no third e-mail came
    assert svc.mail is not None
    mq = svc.mail.queue.browser()
    wait_for(lambda: _empty(mq.stats()), 30, what="an empty mail queue")
    assert len(stack.smtp.received()) == 2

    # a redelivered final outcome (same task, same batch) changes nothing
    batch_id = re.search(r"Batch ([0-9a-f]+)\.", ann)
    assert batch_id is not None and svc.imports.outcomes is not None
    task_id = answer[2]["statusUri"].rsplit("/", 1)[1]
    data = ImportTask(
        experimenter_email="ann@facility.example",
        target_uri=TARGETS["always"],
        omero_host="omero.facility.example",
        session_key=KEY,
        batch_id=batch_id.group(1),
        batch_size=3,
    )
    oq = svc.imports.outcomes
    oq.send(Outcome(task_id, svc.imports.name, "failed", 3, now_ms(), data, error="again"))
    wait_for(lambda: _empty(oq.browser().stats()), 30, what="the outcome to be consumed")
    wait_for(lambda: _empty(mq.stats()), 30, what="an empty mail queue")
    assert len(stack.smtp.received()) == 2
    assert [o.error for o in svc.batches.outcomes(batch_id.group(1)) if o.task_id == task_id] == [
        status[TARGETS["always"]]["lastError"]
    ]


def test_invalid_batch_is_refused_with_every_reason(tmp_path: Path) -> None:
    settings = {"kew": {"url": f"sqlite:///{tmp_path / 'kew.sqlite3'}"}}
    with LocalStack(tmp_path, settings=settings, worker_concurrency=1) as stack:
        bad = [request("file://scope-3/data/x.tif", omeroPort="x"), {"targetUri": "y"}]
        r = httpx.post(f"{stack.base_url}/ome/import", json=bad)
        assert r.status_code == 400
        errors = r.json()["errors"]
        assert "[0].omeroPort: expected a whole number, got the string 'x'" in errors
        assert "[1].experimenterEmail: required" in errors
        assert "[1].sessionKey: required" in errors
        r = httpx.post(f"{stack.base_url}/ome/import", content=b"{nope")
        assert r.status_code == 400 and r.json()["errors"][0].startswith("the body is not JSON")
        assert httpx.get(f"{stack.base_url}/ome/import/{new_id()}").status_code == 404
        # the OpenAPI document says what to send and that no token is needed
        auth = {"Authorization": f"Bearer {stack.admin_token}"}
        doc = httpx.get(f"{stack.base_url}/schema/openapi.json", headers=auth).json()
        post = doc["paths"]["/ome/import"]["post"]
        assert post["security"] == [] and set(post["responses"]) == {"200", "400"}
        item = post["requestBody"]["content"]["application/json"]["schema"]["items"]
        assert item["$ref"].endswith("/OmeroImportRequest")
        props = doc["components"]["schemas"]["OmeroImportRequest"]["properties"]
        assert {"experimenterEmail", "omeroPort", "datasetId", "textAnnotations"} <= set(props)
        assert doc["paths"]["/ome/import/{task_id}"]["get"]["security"] == []
        assert httpx.get(f"{stack.base_url}/queues").status_code == 401  # kew.web's still need one
        svc = stack.service
        assert svc is not None
        assert _empty(svc.imports.queue.browser().stats())  # nothing queued


@pytest.mark.parametrize("encrypted", [False, True])
def test_session_keys_are_encrypted_on_the_broker(tmp_path: Path, encrypted: bool) -> None:
    """With a key configured, the SQLite broker's files never hold the session
    key (without one they do: the check can fail)."""
    from examples.omero_import.request import parse_batch, with_batch
    from examples.omero_import.service import OmeroImportService

    config = load_config(
        env={},
        overrides={
            "kew": {
                "url": f"sqlite:///{tmp_path / 'kew.sqlite3'}",
                "store": "memory://",
                "encryption_keys": _key() if encrypted else None,
            },
            "mail": {"enabled": False},
        },
    )
    svc = OmeroImportService(config)
    try:
        body = httpx.Request("POST", "/", json=[request("/x.tif", session_key=KEY)]).read()
        svc.submit_tasks(with_batch(parse_batch(body), "b1"))
        assert svc.keepalive is not None
        assert svc.imports.queue.browser().stats().ready == 1
        assert svc.keepalive.browser().stats().delayed == 1
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("kew.sqlite3*"))
        assert (KEY.encode() in stored) is not encrypted
    finally:
        svc.close()


def test_bad_configuration_stops_start_up(tmp_path: Path) -> None:
    cfg = tmp_path / "omero.toml"
    cfg.write_text("[import]\nretry_minutes = [10, 'ten']\n")
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "examples.omero_import", "worker", "--config", str(cfg)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEW_OMERO_CONFIG": ""},
    )
    assert r.returncode == 2
    assert "import.retry_minutes[1]: Expected `float`, got `str`" in r.stderr
    with pytest.raises(ConfigError):
        load_config(cfg, env={})


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_report_claimed_by_a_dead_worker_is_sent_by_another(kind: str, tmp_path: Path) -> None:
    """A worker claimed a finished batch's report (``once("report:<batch>")``)
    and died before sending it; the outcome, redelivered, is put back until
    the claim runs out, then the e-mail goes out once."""
    tag = new_id()[:12]
    settings: dict[str, dict[str, Any]] = {
        "kew": {
            "url": _broker_url(kind, tmp_path, tag),
            "events_queue": f"kew.task-events.{tag}",
        },
        "import": {"queue": f"omero.import.{tag}"},
        "session": {"queue": f"omero.keepalive.{tag}"},
        "batches": {"report_lease": 0.5},
        "mail": {"admin": None, "queue": f"kew.mail.{tag}"},
    }
    with LocalStack(tmp_path, settings=settings, worker_concurrency=2) as stack:
        try:
            svc = stack.service
            assert svc is not None and svc.imports.outcomes is not None
            data = ImportTask(
                experimenter_email="ann@facility.example",
                target_uri="/data/plate.tif",
                omero_host="omero.facility.example",
                session_key=KEY,
                batch_id="b-dead",
                batch_size=1,
            )
            # what the dead worker did: recorded the outcome, claimed the report (a
            # claim of its own token, which nobody renews now)
            assert svc.batches.record(
                "b-dead", 1, "t1", target=data.target_uri, email=data.experimenter_email,
                status="succeeded",
            )  # fmt: skip
            idem = svc.batches.idempotency
            assert idem.backend.claim(report_key("b-dead"), "dead-worker", 1000) is (
                ClaimResult.CLAIMED
            )
            assert idem.state(report_key("b-dead")) == "claimed"
            # its outcome message comes back (it was never acked)
            svc.imports.outcomes.send(
                Outcome("t1", svc.imports.name, "succeeded", 1, now_ms(), data)
            )
            (mail,) = stack.smtp.wait(1, 30)
            assert str(mail["To"]) == "ann@facility.example"
            assert "1 of 1 imported" in str(mail["Subject"])
            assert svc.batches.is_reported("b-dead") and idem.is_done(report_key("b-dead"))
            oq = svc.imports.outcomes.browser()
            wait_for(lambda: _empty(oq.stats()), 30, what="no outcome left")
            assert svc.mail is not None
            mq = svc.mail.queue.browser()
            wait_for(lambda: _empty(mq.stats()), 30, what="an empty mail queue")
            assert len(stack.smtp.received()) == 1
        finally:
            _clean(stack)


def test_a_broker_without_idempotency_records_needs_a_batches_store(tmp_path: Path) -> None:
    """RabbitMQ keeps no idempotency records: without [batches] store the
    service refuses to start, naming the key; with one it starts on it."""
    from examples.omero_import.service import OmeroImportService

    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    tag = new_id()[:12]
    base: dict[str, dict[str, Any]] = {
        "kew": {
            "url": "amqp://guest:guest@127.0.0.1:5672/",
            "store": "memory://",
            "events_queue": f"kew.task-events.{tag}",
        },
        "import": {"queue": f"omero.import.{tag}"},
        "session": {"enabled": False},
        "mail": {"enabled": False},
    }
    with pytest.raises(ConfigError, match=r"keeps no idempotency records.*\[batches\] store"):
        OmeroImportService(load_config(env={}, overrides=base))
    store = f"sqlite:///{tmp_path / 'batches.sqlite3'}"
    svc = OmeroImportService(load_config(env={}, overrides={**base, "batches": {"store": store}}))
    try:
        assert not svc.batches.record(
            "b1", 2, "t1", target="/x.tif", email="a@b.c", status="succeeded"
        )
        assert svc.batches.record("b1", 2, "t2", target="/y.tif", email="a@b.c", status="failed")
        assert (tmp_path / "batches.sqlite3").exists()
    finally:
        for name in svc.app.queue_names():
            svc.app.connector.delete(name)
        svc.close()


def test_front_end_and_worker_as_separate_processes(tmp_path: Path) -> None:
    """``python -m examples.omero_import serve`` and ``kew worker ...:app``,
    sharing only the broker and the stores: a POSTed import runs on the
    worker, its status reaches the front end, the e-mail goes out, and both
    stop cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys

    from examples.omero_import.local import FAKE_OMERO
    from examples.omero_import.smtp_sink import SmtpSink
    from kew.testing.util import free_port

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    fake = [sys.executable, FAKE_OMERO]
    with SmtpSink() as smtp:
        config = tmp_path / "omero.toml"
        config.write_text(
            f"""
[kew]
url = "sqlite:///{tmp_path / "kew.sqlite3"}"
store = "sqlite:///{tmp_path / "tasks.sqlite3"}"
[import]
command = {json.dumps([*fake, "import"])}
env = {{ FAKE_OMERO_LOG = "{tmp_path / "calls.jsonl"}", FAKE_OMERO_DELAY = "0" }}
[session]
keepalive_command = {json.dumps([*fake, "sessions", "keepalive"])}
close_command = {json.dumps([*fake, "sessions", "logout"])}
interval = 0.3
[mail]
host = "127.0.0.1"
port = {smtp.port}
security = "none"
admin = "omero-admin@facility.example"
[web]
port = {port}
[batches]
store = "sqlite:///{tmp_path / "batches.sqlite3"}"
"""
        )
        env = {**os.environ, "KEW_OMERO_CONFIG": str(config)}
        kew_cli = str(Path(sys.executable).parent / "kew")
        procs = [
            subprocess.Popen(
                [kew_cli, "worker", "examples.omero_import.service:app", "--record"],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            subprocess.Popen(
                [sys.executable, "-m", "examples.omero_import", "serve"],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        ]
        try:
            base = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    return httpx.get(f"{base}/health", timeout=2).status_code in (200, 503)
                except httpx.TransportError:
                    return False

            wait_for(up, 60, what="the front end")
            r = httpx.post(f"{base}/ome/import", json=[request("/data/plate.tif", session_key=KEY)])
            assert r.status_code == 200, r.text
            uri = r.json()[0]["statusUri"]
            assert httpx.get(uri).status_code == 200  # known at once
            (mail,) = smtp.wait(1, 60)
            assert "1 of 1 imported" in str(mail["Subject"])
            assert uri in text_of(mail)  # the log's URI, from [web] host and port
            wait_for(lambda: httpx.get(uri).headers["X-Kew-Status"] == "succeeded", 30)
            assert "IMPORT_DONE" in httpx.get(uri).text
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all(KEY not in out for out in outs)


def test_an_import_past_its_time_limit_is_killed_and_retried(tmp_path: Path) -> None:
    settings: dict[str, dict[str, Any]] = {
        "kew": {"url": f"sqlite:///{tmp_path / 'kew.sqlite3'}"},
        "import": {"timeout": 1.0, "retry_minutes": [0.005]},
        "session": {"enabled": False},
    }
    with LocalStack(tmp_path, settings=settings, worker_concurrency=2) as stack:
        target = f"/data/{new_id()}/hang.tif"
        r = httpx.post(f"{stack.base_url}/ome/import", json=[request(target)])
        assert r.status_code == 200, r.text
        uri = r.json()[0]["statusUri"]
        mails = stack.smtp.wait(2, 60)  # the experimenter's and the administrator's
        assert all("timed out after 1.0 s" in text_of(m) for m in mails)
        doc = wait_for(
            lambda: (
                (d := httpx.get(uri, params={"format": "json"}).json())["status"] == "failed" and d
            ),
            30,
        )
        assert doc["attempt"] == 2
        assert doc["output"].count("time limit of 1.0 s reached") == 2
        assert len(_imports(stack.calls(), "hang.tif")) == 2
        # the killed importers are gone, process group and all
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if target.encode() in cmdline.read_bytes():
                    alive.append(cmdline.parent.name)
            except OSError:
                continue
        assert alive == []
