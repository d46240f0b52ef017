"""Outcome e-mail as a user runs it: tasks submitted with ``kew send``, run
by ``kew worker FILE:app`` in its own process (SQLite broker and store), the
mails received by a real SMTP server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.smtp import SmtpServer, body_of

APP = """
import os

import msgspec

from kew.task import App, Intervals, Permanent
from kew.task.mail import MailNotifier, SmtpConfig, mail_queue


class Order(msgspec.Struct):
    item: str
    email: str


here = os.path.dirname(os.path.abspath(__file__))
app = App(f"sqlite:///{here}/kew.sqlite3", name="shop", store=f"sqlite:///{here}/tasks.sqlite3")
smtp = SmtpConfig(
    sender="Shop <shop@example.org>",
    host="127.0.0.1",
    port=int(os.environ["SMTP_PORT"]),
    security="none",
    timeout=5,
)
mail = mail_queue(app, smtp, retry=Intervals([0.1]))


@app.task("orders", retry=Intervals([0.05]), notify=True)
def order(o: Order) -> None:
    if o.item == "unicorn":
        raise Permanent("out of unicorns")


MailNotifier(app, order, mail, requester=lambda o: o.email, admin="ops@example.org",
             base_url="http://shop.test")
"""


def test_kew_worker_process_sends_the_outcome_mails(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(textwrap.dedent(APP))
    with SmtpServer() as server:
        env = {**os.environ, "SMTP_PORT": str(server.port)}
        kew = Path(sys.executable).parent / "kew"
        spec = f"{tmp_path / 'shopapp.py'}:app"

        def send(body: str) -> str:
            r = subprocess.run(
                [str(kew), "send", "--app", spec, "orders", body],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout.strip()

        ok = send('{"item": "book", "email": "ann@example.org"}')
        bad = send('{"item": "unicorn", "email": "bob@example.org"}')
        worker = subprocess.Popen(
            [str(kew), "worker", spec, "--record"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            server.wait_for(3, timeout=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                out, _ = worker.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                out, _ = worker.communicate()
                raise AssertionError(f"the worker did not stop on SIGTERM:\n{out}") from None
        assert worker.returncode == 0, out
        subjects = sorted((m["To"], m["Subject"]) for m in server.messages)
        assert subjects == [
            ("ann@example.org", f"[kew] orders task {ok} succeeded"),
            ("bob@example.org", f"[kew] orders task {bad} failed"),
            ("ops@example.org", f"[kew] orders task {bad} failed"),
        ]
        (ops,) = server.to("ops@example.org")
        body = body_of(ops)
        assert "permanent failure in attempt 1: out of unicorns" in body
        assert f"Status and output: http://shop.test/tasks/{bad}" in body
        assert "Requester: bob@example.org" in body
        assert "sent automatically by shop" in body
