"""A chaos producer process: ``python -m tests.chaos.producer URL QUEUE OUTDIR FIRST LAST``.

Sends task ids FIRST..LAST-1 in batches of 50; after each batch is accepted
(``send_many`` returned: durable), appends its ids to OUTDIR/sent.log.  A
batch that fails is sent again (the broker may be restarting).
"""

from __future__ import annotations

import os
import sys
import time

import kew


def main() -> None:
    url, queue, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    first, last = int(sys.argv[4]), int(sys.argv[5])
    fd = os.open(os.path.join(outdir, "sent.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    q = None
    i = first
    while i < last:
        batch = list(range(i, min(i + 50, last)))
        try:
            if q is None:
                q = kew.Queue(kew.connect(url), queue, int)
            q.send_many(batch)
        except Exception as e:
            print(f"producer: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            q = None
            time.sleep(0.3)
            continue
        os.write(fd, "".join(f"{t}\n" for t in batch).encode())
        i += len(batch)
        time.sleep(0.25)  # spread the work over the chaos window
    print("SENT", flush=True)


if __name__ == "__main__":
    main()
