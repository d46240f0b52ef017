"""A chaos worker process: ``python -m tests.chaos.worker URL QUEUE OUTDIR``.

Consumes task ids; for each, appends ``<id> <pid>`` to OUTDIR/done.log (one
small O_APPEND write: atomic) and returns, so kew acks. Task ids divisible by
97 fail for good (their outcome is the dead letters). Runs until killed.
"""

from __future__ import annotations

import os
import sys
import time

import kew


def main() -> None:
    url, queue, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    fd = os.open(os.path.join(outdir, "done.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def handle(task: int) -> None:
        if task % 97 == 0:
            raise RuntimeError(f"task {task} fails for good")
        time.sleep(0.003)  # a little work, so that kills land mid-task
        os.write(fd, f"{task} {os.getpid()}\n".encode())

    while True:  # a broker outage may end a connector; make a new one
        try:
            q = kew.Queue(kew.connect(url), queue, int)
            with q.sink(handle, concurrency=2):
                print("READY", flush=True)
                while True:
                    time.sleep(3600)
        except Exception as e:  # the broker is down: try again
            print(f"worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            time.sleep(0.5)


if __name__ == "__main__":
    main()
