"""kew queues in one minute, on the embedded SQLite default (no broker to install).

A typed queue of thumbnail requests; a consumer that fails now and then;
retries on short intervals; what still fails ends in the dead letters with
its reason, and so does a malformed message.  Run it twice: the queue file
(kew.sqlite3 in the working directory) keeps what was not done.
"""

from __future__ import annotations

import threading

import msgspec

import kew
from kew.testing.util import wait_for


class Thumbnail(msgspec.Struct, frozen=True):
    image_id: int
    size: int = 256
    fail_times: int = 0  # how often rendering fails before it works (for the demo)


attempts: dict[int, int] = {}
outcome: dict[int, str] = {}
lock = threading.Lock()


def render(t: Thumbnail) -> kew.RepeatAction:
    with lock:
        n = attempts[t.image_id] = attempts.get(t.image_id, 0) + 1
    if n <= t.fail_times:
        print(f"  image {t.image_id}: attempt {n} failed (OMERO busy), will retry")
        return kew.RepeatAction.REPEAT
    print(f"  image {t.image_id}: rendered at {t.size}px on attempt {n}")
    outcome[t.image_id] = "done"
    return kew.RepeatAction.STOP


def gave_up(t: Thumbnail) -> None:
    print(f"  image {t.image_id}: gave up after {attempts[t.image_id]} attempts")
    outcome[t.image_id] = "gave up"


def main() -> None:
    conn = kew.connect()  # no URL, no KEW_URL: sqlite:///kew.sqlite3
    print(f"broker: {conn.url}")
    q = kew.Queue(conn, "thumbnails", Thumbnail)
    q.browser().purge()
    q.dead.purge()

    q.send_many([Thumbnail(1), Thumbnail(2, fail_times=1), Thumbnail(3, fail_times=9)])
    conn.producer("thumbnails").send(  # a body that is not a Thumbnail
        kew.qchan.spi.Message("bad", b'{"image_id": "three"}')
    )
    print("sent 3 thumbnail requests and 1 malformed message; consuming with retries 0.2s, 0.4s")
    with q.repeat_sink(render, [0.2, 0.4], gave_up, concurrency=2):
        wait_for(lambda: len(outcome) == 3, 30, what="all three outcomes")
    print(f"\nqueue now: {q.browser().stats()}")
    for d in q.dead.list():
        print(f"dead letter {d.id}: {d.reason}")
    assert outcome == {1: "done", 2: "done", 3: "gave up"}


if __name__ == "__main__":
    main()
