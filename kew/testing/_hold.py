"""``python -m kew.testing._hold URL QUEUE``: take one message and hold it.

Prints ``HOLDING <id>`` once it has the message, then waits to be killed.
The conformance kit SIGKILLs it to check crash redelivery.
"""

from __future__ import annotations

import sys
import time

import kew


def main() -> None:
    url, queue = sys.argv[1], sys.argv[2]
    consumer = kew.connect(url).consumer(queue, 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = consumer.fetch(1, 0.5)
        if got:
            print(f"HOLDING {got[0].message.id}", flush=True)
            time.sleep(3600)
    print("NOTHING", flush=True)


if __name__ == "__main__":
    main()
