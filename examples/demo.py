"""kew's main demo: the OMERO import service, on the embedded SQLite default.

No broker, no OMERO, no mail server to install: this starts a local SMTP
sink, the import service with its workers, the HTTP front end and the
monitoring page, with a stand-in for the ``omero`` importer.  It POSTs a
batch of three imports the way an acquisition workstation would: one that
succeeds, one that fails once and succeeds on its retry, one that fails for
good.  It prints the poll URLs, follows the importer's output, shows the
e-mails the experimenter and the administrator receive, and leaves the
monitoring page up until Ctrl-C (``--no-wait`` or ``KEW_DEMO_EXIT=1``: exit
at the end).

    python3 -m pip install --quiet nox && python3 -m nox -s demo
    python examples/demo.py [--no-wait] [--dir DIR] [--url BROKER_URL]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from examples.omero_import.local import LocalStack, request  # noqa: E402
from examples.omero_import.smtp_sink import text_of  # noqa: E402
from kew.qchan.crypto import new_key  # noqa: E402
from kew.testing.util import wait_for  # noqa: E402

TARGETS = {
    "file://scope-3/data/run-1/plate-ok.tif": "succeeds",
    "file://scope-3/data/run-1/plate-fail-once.tif": "fails once, then succeeds on its retry",
    "file://scope-3/data/run-1/plate-fail-always.tif": "fails on every attempt",
}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _follow(client: httpx.Client, uris: dict[str, str], timeout: float = 120) -> dict[str, str]:
    """Print each import's output as it comes; return the final statuses."""
    seen = dict.fromkeys(uris, 0)
    status: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(status) < len(uris) and time.monotonic() < deadline:
        for target, uri in uris.items():
            if target in status:
                continue
            r = client.get(uri, params={"format": "json"})
            if r.status_code == 404:  # not recorded yet
                continue
            r.raise_for_status()
            doc = r.json()
            text: str = doc["output"]
            name = target.rsplit("/", 1)[-1]
            for line in text[seen[target] :].splitlines():
                _say(f"  {name:<24} | {line}")
            seen[target] = len(text)
            if doc["status"] in ("succeeded", "failed"):
                status[target] = doc["status"]
                _say(f"  {name:<24} = {doc['status'].upper()} after {doc['attempt']} attempt(s)")
        time.sleep(0.2)
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-wait", action="store_true", help="exit at the end")
    parser.add_argument("--dir", help="working directory, wiped first (default: a temporary one)")
    parser.add_argument("--url", help="broker URL (default: the embedded SQLite default)")
    args = parser.parse_args()
    no_wait = args.no_wait or os.environ.get("KEW_DEMO_EXIT") == "1"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per poll

    if args.dir:
        workdir = Path(args.dir).resolve()
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="kew-demo-"))
    try:
        return run(workdir, args.url, no_wait)
    finally:
        if not args.dir:
            os.chdir("/")
            shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: Path, url: str | None, no_wait: bool) -> int:
    os.chdir(workdir)  # sqlite:///kew.sqlite3, the default broker, lives here
    for target in TARGETS:  # the "acquisitions", where the mount point says
        local = workdir / "scope-3" / target.split("data/", 1)[1]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(b"not really an image")
    # session keys travel in the import and keep-alive messages: encrypt those queues
    settings: dict[str, dict[str, object]] = {"kew": {"encryption_keys": f"demo:{new_key()}"}}
    if url:
        settings["kew"]["url"] = url

    where = "the embedded SQLite broker" if not url else "the broker at --url"
    _say(f"kew demo: the OMERO import service on {where}")
    _say(f"  working directory: {workdir}")
    with LocalStack(workdir, settings=settings) as stack:
        svc = stack.service
        assert svc is not None
        # the web framework sets the root logger to INFO: keep the demo's output readable
        logging.getLogger().setLevel(logging.WARNING)
        _say(f"  broker: {svc.app.connector.url}")
        _say(f"  web front end: {stack.base_url}   SMTP sink: 127.0.0.1:{stack.smtp.port}")
        _say("  import and keep-alive queues encrypted (AES-GCM): they carry OMERO session keys")
        _say("  retry intervals (demo): 0.6 s, 0.6 s; session keep-alive every 0.4 s\n")

        batch = [request(t, name=t.rsplit("/", 1)[-1]) for t in TARGETS]
        with httpx.Client(timeout=30) as client:
            _say("POST /ome/import with a batch of three (as a Smuggler client sends it):")
            for t, what in TARGETS.items():
                _say(f"  {t}  ({what})")
            r = client.post(f"{stack.base_url}/ome/import", json=batch)
            r.raise_for_status()
            answer = r.json()
            _say(f"\n{r.status_code}: the poll URLs:")
            for a in answer:
                _say(f"  {a['statusUri']}   <- {a['targetUri']}")
            bad = client.post(f"{stack.base_url}/ome/import", json=[{"omeroPort": "x"}])
            _say(f"\n(an invalid request gets {bad.status_code} with every reason:")
            for reason in bad.json()["errors"]:
                _say(f"   {reason}")
            _say(")\n\nFollowing the importer's output:")
            uris = {a["targetUri"]: a["statusUri"] for a in answer}
            statuses = _follow(client, uris)

        _say("\nThe e-mails, once the whole batch is done:")
        mails = stack.smtp.wait(2, 60)
        for m in mails:
            _say(f"  --- To: {m['To']}  Subject: {m['Subject']}")
            for line in text_of(m).rstrip().splitlines():
                _say(f"  | {line}")
        wait_for(
            lambda: any(c[:2] == ["sessions", "logout"] for c in stack.calls()),
            30,
            what="the OMERO session to be closed",
        )
        pings = sum(c[:2] == ["sessions", "keepalive"] for c in stack.calls())
        _say(f"\nOMERO session kept alive {pings} time(s) while the batch ran, then closed.")

        ok = sorted(t for t, s in statuses.items() if s == "succeeded")
        failed = sorted(t for t, s in statuses.items() if s == "failed")
        _say("\nSummary:")
        _say(f"  imported: {len(ok)}  " + ", ".join(t.rsplit("/", 1)[-1] for t in ok))
        _say(f"  failed:   {len(failed)}  " + ", ".join(t.rsplit("/", 1)[-1] for t in failed))
        _say(f"  e-mails:  {len(mails)}  (" + ", ".join(str(m["To"]) for m in mails) + ")")
        _say(f"\nMonitoring page: {stack.base_url}/   token: {stack.admin_token}")
        _say(
            f"  (API: curl -H 'Authorization: Bearer {stack.admin_token}' {stack.base_url}/queues)"
        )
        expected = (len(ok), len(failed), len(mails))
        if expected != (2, 1, 2):
            _say(f"demo FAILED: expected 2 imported, 1 failed, 2 e-mails; got {expected}")
            return 1
        _say("demo OK")
        if no_wait:
            return 0
        _say("\nLeaving it up for you to look at; Ctrl-C to stop.")
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _say("\nstopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
