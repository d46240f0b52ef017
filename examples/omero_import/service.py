"""The OMERO import service: Smuggler's web import on kew.task.

Queues (names configurable):

* ``omero.import`` — a command task per import (the importer as a
  subprocess, its output the task's output), retried on Smuggler's
  intervals; encrypted when a key is configured (it carries session keys);
  its outcomes go to ``omero.import.outcomes``.
* ``omero.import.outcomes`` — consumed by the batch bookkeeping: when every
  import of a POST is final, one e-mail to each experimenter listing what
  succeeded and what failed, and one to the administrator about failures.
* ``omero.keepalive`` — pings each batch's OMERO session every
  ``session.interval`` seconds until the batch is finished, then closes it.
* ``kew.mail`` — the outgoing mail, with its own retries and dead letters.

``kew worker examples.omero_import.service:app`` runs the workers,
``kew serve`` / :func:`examples.omero_import.web.create_web` the front end;
both read the configuration named by ``KEW_OMERO_CONFIG``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

import msgspec

import kew
from kew.qchan.spi.dedupe import DedupeCapable
from kew.task.app import App, TaskQueue
from kew.task.command import CommandSpec
from kew.task.model import Outcome, TaskEvent
from kew.task.retry import Intervals

from .batches import BatchStore, TaskOutcome
from .command import import_argv, local_path, redacted, session_args
from .config import Config, ConfigError, load_config, smtp_config
from .report import admin_letter, experimenter_letters
from .request import ImportTask, parse_batch, with_batch

log = logging.getLogger("kew.omero")


class KeepAlive(msgspec.Struct, frozen=True, rename="camel"):
    """One OMERO session of a batch to keep alive (a secret: encrypted queue)."""

    batch_id: str
    omero_host: str
    omero_port: int
    session_key: str
    pings: int = 0

    def __repr__(self) -> str:
        return (
            f"KeepAlive({self.batch_id!r}, {self.omero_host}:{self.omero_port}, pings={self.pings})"
        )

    __str__ = __repr__


class Submitted(msgspec.Struct, frozen=True, rename="camel"):
    """What ``POST /ome/import`` answers for each import."""

    status_uri: str
    target_uri: str


class OmeroImportService:
    """Everything but the HTTP server: queues, handlers, bookkeeping."""

    def __init__(self, config: Config, *, connector: Any = None) -> None:
        self.config = config
        c = config
        self.app = App(
            connector if connector is not None else c.kew.url,
            name=c.kew.name,
            store=c.kew.store,
            events_queue=c.kew.events_queue,
        )
        keys = c.kew.encryption_keys
        try:
            self.batches = self._open_batches()
        except BaseException:
            self.app.close()
            raise
        self.imports: TaskQueue[ImportTask] = self.app.command_task(
            c.import_.queue,
            ImportTask,
            self._build_command,
            retry=Intervals.minutes(*c.import_.retry_minutes),
            timeout=c.import_.timeout,
            nice=c.import_.nice,
            notify=True,
            encryption_keys=keys,
            concurrency=c.import_.concurrency,
        )
        outcomes = self.imports.outcomes
        assert outcomes is not None
        self.app.consumer(outcomes, self._on_outcome)
        self.keepalive: kew.Queue[KeepAlive] | None = None
        if c.session.enabled:
            self.keepalive = kew.Queue(
                self.app.connector, c.session.queue, KeepAlive, encryption_keys=keys
            )
            self.app.consumer(self.keepalive, self._on_keepalive, concurrency=2)
        self.mail: TaskQueue[Any] | None = None
        if c.mail.enabled:
            from kew.task.mail import mail_queue

            smtp = smtp_config(c)
            self.mail = mail_queue(
                self.app, smtp, name=c.mail.queue, retry=Intervals.minutes(*c.mail.retry_minutes)
            )
        web = c.web.base_url or f"http://{c.web.host}:{c.web.port}"
        self._status_url = web.rstrip("/") + "/ome/import/{task_id}"

    def _open_batches(self) -> BatchStore:
        """The bookkeeping on ``[batches] store`` if set, else on the broker's
        own backend (SQLite, Redis, memory keep idempotency records; RabbitMQ
        and STOMP do not: then the store URL is required)."""
        b = self.config.batches
        if b.store is not None:
            return BatchStore.open(b.store, lease=b.report_lease)
        conn = self.app.connector
        if not isinstance(conn, DedupeCapable):
            raise ConfigError(
                f"the broker {getattr(conn, 'url', '?')} keeps no idempotency records for the "
                "batch bookkeeping: set [batches] store (KEW_OMERO_BATCHES_STORE) to a store "
                "shared by every worker: sqlite:///path or redis://host:port"
            )
        return BatchStore.open(conn, lease=b.report_lease)

    # -- the front end's part -------------------------------------------

    def status_url(self, base_url: str) -> None:
        """Tell the e-mails where a task's log is: ``{base_url}/ome/import/{id}``."""
        self._status_url = base_url.rstrip("/") + "/ome/import/{task_id}"

    def submit(self, body: bytes, base_url: str) -> list[Submitted]:
        """Validate a POSTed batch and queue it; raises InvalidRequest.

        The imports are also recorded as queued in the task store here, so
        their status URIs answer at once (the recorder, applying the same
        events later, changes nothing: the store is idempotent)."""
        tasks = with_batch(
            parse_batch(body, max_batch=self.config.import_.max_batch), kew.qchan.new_id()
        )
        done = self.submit_tasks(tasks)
        now = kew.qchan.spi.now_ms()
        try:
            self.app.store.apply(
                [TaskEvent(tid, self.imports.name, "queued", now) for tid, _ in done]
            )
        except Exception:  # the recorder will bring them
            log.warning(
                "cannot record %d queued imports in the task store", len(done), exc_info=True
            )
        return [
            Submitted(f"{base_url.rstrip('/')}/ome/import/{tid}", t.target_uri) for tid, t in done
        ]

    def submit_tasks(self, tasks: Sequence[ImportTask]) -> list[tuple[str, ImportTask]]:
        """Queue validated imports of one batch (and their session keep-alive)."""
        done = [(self.imports.submit(t), t) for t in tasks]
        if self.keepalive is not None and tasks:
            sessions = {(t.omero_host, t.omero_port, t.session_key) for t in tasks}
            due = kew.qchan.spi.now_ms() + int(self.config.session.interval * 1000)
            for host, port, key in sorted(sessions):
                self.keepalive.post(KeepAlive(tasks[0].batch_id, host, port, key), deliver_at=due)
        return done

    # -- workers' part -----------------------------------------------------

    def _build_command(self, task: ImportTask) -> CommandSpec:
        c = self.config.import_
        path = local_path(task.target_uri, c.mount_points, c.relative_root)
        return CommandSpec(
            import_argv(c.command, task, path), env=c.env or None, timeout=c.timeout, nice=c.nice
        )

    def _on_outcome(self, outcome: Outcome[ImportTask]) -> None:
        if outcome.kind == "attempt-failed":
            return
        t = outcome.data
        if not t.batch_id:  # submitted without a batch (kew send, REST): a batch of its own
            t = msgspec.structs.replace(t, batch_id=outcome.task_id, batch_size=1)
        complete = self.batches.record(
            t.batch_id,
            t.batch_size,
            outcome.task_id,
            target=t.target_uri,
            email=t.experimenter_email,
            status=outcome.kind,
            error=outcome.error,
            attempt=outcome.attempt,
        )
        if not complete:
            return
        try:
            reported = self._report(t.batch_id)
        except Exception:
            log.warning("cannot report batch %s yet; trying again", t.batch_id, exc_info=True)
            reported = False
        if not reported:
            # Another worker is reporting it (and might die doing so), or the
            # mail queue was out of reach: look again once a claim would have
            # run out.  The outcome counts once however often it comes back.
            assert self.imports.outcomes is not None
            again = kew.qchan.spi.now_ms() + int(self.config.batches.report_lease * 1000)
            self.imports.outcomes.post(outcome, deliver_at=again)

    def _report(self, batch_id: str) -> bool:
        """Send the batch's e-mails once (``once("report:<batch>")``); True if
        they are sent (now or before), False if another process holds the job."""
        return self.batches.report(batch_id, lambda outcomes: self._send_report(batch_id, outcomes))

    def _send_report(self, batch_id: str, outcomes: list[TaskOutcome]) -> None:
        letters = experimenter_letters(batch_id, outcomes, status_url=self._status_url)
        admin = self.config.mail.admin
        a = admin_letter(batch_id, outcomes, admin, status_url=self._status_url) if admin else None
        if a is not None:
            letters.append(a)
        if self.mail is not None:
            from kew.task.mail import Mail

            for letter in letters:
                self.mail.submit(Mail(to=[letter.to], subject=letter.subject, body=letter.body))
        ok = sum(o.status == "succeeded" for o in outcomes)
        log.info(
            "batch %s finished: %d imported, %d failed; %d e-mail(s)",
            batch_id,
            ok,
            len(outcomes) - ok,
            len(letters) if self.mail is not None else 0,
        )

    def _session_command(self, command: Sequence[str], k: KeepAlive) -> bool:
        argv = [*command, *session_args(k.omero_host, k.omero_port, k.session_key)]
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.config.session.timeout,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.config.import_.env} if self.config.import_.env else None,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("session command %s failed: %s", redacted(argv), e)
            return False
        if r.returncode != 0:
            log.warning(
                "session command %s exited with %d: %s",
                redacted(argv),
                r.returncode,
                (r.stderr or r.stdout).strip()[-500:].replace(k.session_key, "****"),
            )
            return False
        return True

    def _on_keepalive(self, k: KeepAlive) -> None:
        assert self.keepalive is not None
        s = self.config.session
        if self.batches.is_complete(k.batch_id):
            self._session_command(s.close_command, k)
            log.info(
                "batch %s finished: closed its session on %s after %d pings",
                k.batch_id,
                k.omero_host,
                k.pings,
            )
            return
        self._session_command(s.keepalive_command, k)
        due = kew.qchan.spi.now_ms() + int(s.interval * 1000)
        self.keepalive.post(msgspec.structs.replace(k, pings=k.pings + 1), deliver_at=due)

    def close(self) -> None:
        self.batches.close()
        self.app.close()


_service: OmeroImportService | None = None
_lock = threading.Lock()


def service() -> OmeroImportService:
    """The process's service, from ``$KEW_OMERO_CONFIG`` (made once)."""
    global _service
    with _lock:
        if _service is None:
            _service = OmeroImportService(load_config())
        return _service


def __getattr__(name: str) -> Any:
    """``app`` (the kew.task App, for ``kew worker MODULE:app``) is made on
    first use, so importing this module reads no configuration."""
    if name == "app":
        return service().app
    raise AttributeError(name)


__all__ = ["KeepAlive", "OmeroImportService", "Submitted", "service"]
