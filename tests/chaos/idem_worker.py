"""An idempotent chaos worker: ``python -m tests.chaos.idem_worker URL QUEUE OUTDIR KIND``.

Like ``tests.chaos.worker``, and for each task also does two side effects
through a ``kew.idempotency`` store on the same backend (``KIND``: ``sqlite``
or ``redis``):

* the *atomic* effect, written in the store's transaction with the done mark
  (SQLite: a row in ``chaos_effect``; Redis: HINCRBY on ``chaos:effects``):
  it must happen exactly once per task, whatever is killed when;
* the *claimed* effect, a line in OUTDIR/once.log inside ``store.once``: it
  repeats only if a worker dies between the effect and its done mark.

Then it appends the task to OUTDIR/done.log (every execution) and returns.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import kew
from kew.idempotency import IdempotencyStore, open_store

EFFECTS_KEY = "chaos:effects"  # Redis hash: task -> times the atomic effect happened


def atomic_effect(kind: str, task: int) -> Callable[[Any], object]:
    if kind == "sqlite":
        return lambda db: db.execute("INSERT INTO chaos_effect (task) VALUES (?)", (task,))
    return lambda pipe: pipe.hincrby(EFFECTS_KEY, str(task), 1)


def handler(
    store: IdempotencyStore, kind: str, done_fd: int, once_fd: int
) -> Callable[[int], None]:
    def handle(task: int) -> None:
        if task % 97 == 0:
            raise RuntimeError(f"task {task} fails for good")
        with store.once(f"claimed-{task}") as first:
            if first:
                os.write(once_fd, f"{task} {os.getpid()}\n".encode())
        store.atomic_once(f"atomic-{task}", atomic_effect(kind, task))
        time.sleep(0.003)  # a little work, so that kills land mid-task
        os.write(done_fd, f"{task} {os.getpid()}\n".encode())

    return handle


def main() -> None:
    url, queue, outdir, kind = sys.argv[1:5]
    done_fd = os.open(os.path.join(outdir, "done.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    once_fd = os.open(os.path.join(outdir, "once.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    while True:  # a broker outage may end a connector; make a new one
        try:
            conn = kew.connect(url)
            store = open_store(conn, "chaos", lease=1.0)
            q = kew.Queue(conn, queue, int)
            with q.sink(handler(store, kind, done_fd, once_fd), concurrency=2):
                print("READY", flush=True)
                while True:
                    time.sleep(3600)
        except Exception as e:  # the broker is down: try again
            print(f"worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            time.sleep(0.5)


if __name__ == "__main__":
    main()
