"""The outcome e-mails of a finished batch: one to each experimenter, one to
the administrator when something failed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .batches import TaskOutcome


@dataclass(frozen=True)
class Letter:
    to: str
    subject: str
    body: str


def _why(o: TaskOutcome) -> str:
    error = o.error.strip() or "failed"
    return error if "attempt" in error else f"after {o.attempt} attempt(s): {error}"


def _lines(outcomes: Sequence[TaskOutcome], status_url: str | None) -> list[str]:
    out = []
    for o in outcomes:
        line = f"  - {o.target}"
        if o.status == "failed":
            line += f"\n      {_why(o)}"
        if status_url:
            line += f"\n      log: {status_url.format(task_id=o.task_id)}"
        out.append(line)
    return out


def experimenter_letters(
    batch_id: str, outcomes: Sequence[TaskOutcome], *, status_url: str | None = None
) -> list[Letter]:
    """One letter per experimenter of the batch, listing their targets."""
    letters = []
    for email in sorted({o.email for o in outcomes}):
        mine = [o for o in outcomes if o.email == email]
        ok = [o for o in mine if o.status == "succeeded"]
        bad = [o for o in mine if o.status != "succeeded"]
        if not bad:
            subject = f"OMERO import done: {len(ok)} of {len(mine)} imported"
        else:
            subject = f"OMERO import finished: {len(ok)} imported, {len(bad)} failed"
        body = ["Your OMERO import request has finished.", ""]
        if ok:
            body += [f"Imported ({len(ok)}):", *_lines(ok, status_url), ""]
        if bad:
            body += [f"Failed ({len(bad)}):", *_lines(bad, status_url), ""]
            body += ["The facility's administrator has been told about the failures.", ""]
        body += [f"Batch {batch_id}."]
        letters.append(Letter(email, subject, "\n".join(body) + "\n"))
    return letters


def admin_letter(
    batch_id: str, outcomes: Sequence[TaskOutcome], admin: str, *, status_url: str | None = None
) -> Letter | None:
    bad = [o for o in outcomes if o.status != "succeeded"]
    if not bad:
        return None
    body = [
        f"{len(bad)} of {len(outcomes)} imports of batch {batch_id} failed for good "
        "(retries exhausted or a permanent error):",
        "",
    ]
    for o in bad:
        body.append(f"  - {o.target} (requested by {o.email}, task {o.task_id})")
        body.append(f"      {_why(o)}")
        if status_url:
            body.append(f"      log: {status_url.format(task_id=o.task_id)}")
    subject = f"OMERO import failures: {len(bad)} in batch {batch_id}"
    return Letter(admin, subject, "\n".join(body) + "\n")
