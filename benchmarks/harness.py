"""Send and consume rates for any kew URL, next to a raw baseline.

    python benchmarks/harness.py --url sqlite:///bench.sqlite3 -n 5000
    python benchmarks/harness.py --url memory:// --url redis://127.0.0.1/14

Messages are 200-byte typed msgspec Structs.  Lines:
  send       one ``Queue.send`` per message (each durable before the next)
  send_many  ``Queue.send_many`` in batches of --batch
  consume    a ``Queue.sink`` (prefetch --prefetch) taking all N, ack each
For sqlite:// URLs the same work is also done by a raw ``sqlite3`` loop (same
pragmas, same table shape: insert per transaction, batch insert, claim a
batch + delete per message), and the ratio kew/raw is the figure that counts.
Writes a markdown table to stdout and to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

import kew


class Sample(msgspec.Struct, frozen=True):
    id: int
    name: str
    payload: str


def make(n: int) -> list[Sample]:
    # 200 bytes of JSON each
    base = len(msgspec.json.encode(Sample(0, "sample", "")))
    return [Sample(i, "sample", "x" * (200 - base - len(str(i)) + 1)) for i in range(n)]


def rate(n: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def bench_kew(url: str, n: int, batch: int, prefetch: int) -> dict[str, float]:
    conn = kew.connect(url)
    name = f"bench-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, Sample)
    items = make(n)
    out: dict[str, float] = {}
    try:
        n_single = min(n, 5000)
        out["send"] = rate(n_single, lambda: [q.send(s) for s in items[:n_single]] and None)
        q.browser().purge()

        def many() -> None:
            for i in range(0, n, batch):
                q.send_many(items[i : i + batch])

        out["send_many"] = rate(n, many)
        done = threading.Event()
        count = [0]

        def take(_: Sample) -> None:
            count[0] += 1
            if count[0] == n:
                done.set()

        t0 = time.perf_counter()
        sub = q.sink(take, prefetch=prefetch)
        done.wait(600)
        out["consume"] = n / (time.perf_counter() - t0)  # to the last message, not the stop
        sub.stop()
    finally:
        conn.delete(name)
        conn.close()
    return out


def bench_raw_sqlite(path: str, n: int, batch: int, prefetch: int) -> dict[str, float]:
    """The same inserts/claims/deletes with sqlite3 alone."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(
        "CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, id TEXT,"
        " body BLOB, headers BLOB, avail_at INTEGER, owner TEXT, count INTEGER DEFAULT 0);"
        "CREATE INDEX IF NOT EXISTS m_next ON m (queue, avail_at, seq);"
    )
    enc = msgspec.json.Encoder()
    items = [enc.encode(s) for s in make(n)]
    headers = b'{"content-type":"application/json"}'
    now = lambda: time.time_ns() // 1_000_000  # noqa: E731
    ins = "INSERT INTO m (queue, id, body, headers, avail_at) VALUES ('q', ?, ?, ?, ?)"
    out: dict[str, float] = {}

    def single() -> None:
        for i, body in enumerate(items[: min(n, 2000)]):
            db.execute(ins, (str(i), body, headers, now()))  # autocommit: one transaction

    out["send"] = rate(min(n, 2000), single)
    db.execute("DELETE FROM m")

    def many() -> None:
        for i in range(0, n, batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                ins, [(str(j), b, headers, now()) for j, b in enumerate(items[i : i + batch])]
            )
            db.execute("COMMIT")

    out["send_many"] = rate(n, many)
    db.execute("PRAGMA synchronous=NORMAL")  # kew's consumer connection does the same

    def consume() -> None:
        dec = msgspec.json.Decoder(Sample)
        left = n
        while left:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "UPDATE m SET avail_at = ?, owner = 'me', count = count + 1 WHERE seq IN "
                "(SELECT seq FROM m WHERE queue = 'q' AND avail_at <= ? ORDER BY avail_at, seq "
                "LIMIT ?) RETURNING seq, body",
                (now() + 30000, now(), prefetch),
            ).fetchall()
            db.execute("COMMIT")
            for seq, body in rows:
                dec.decode(body)
                db.execute("DELETE FROM m WHERE seq = ? AND owner = 'me'", (seq,))
            left -= len(rows)

    out["consume"] = rate(n, consume)
    db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", action="append", help="kew URL (repeatable); default sqlite")
    ap.add_argument("-n", type=int, default=5000, help="messages per line (send: at most 2000)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--prefetch", type=int, default=100)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kew-bench-")
    urls = args.url or [f"sqlite:///{tmp}/kew.sqlite3"]
    lines = [
        f"n={args.n} messages of 200 bytes, batch={args.batch}, prefetch={args.prefetch}",
        "",
        "| URL | line | kew msg/s | raw msg/s | kew / raw |",
        "|---|---|---:|---:|---:|",
    ]
    for url in urls:
        got = bench_kew(url, args.n, args.batch, args.prefetch)
        raw: dict[str, float] = {}
        if url.startswith("sqlite:"):
            raw = bench_raw_sqlite(f"{tmp}/raw.sqlite3", args.n, args.batch, args.prefetch)
        for line, value in got.items():
            r = raw.get(line)
            ratio = f"{value / r:.2f}" if r else "-"
            raw_text = f"{r:,.0f}" if r else "-"
            lines.append(
                f"| {kew.connect(url).url} | {line} | {value:,.0f} | {raw_text} | {ratio} |"
            )
    table = "\n".join(lines)
    print(table)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"harness-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
