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


Rate = tuple[float, float]
"""msg/s, and the CPU time of the client process per message (us): the
steadier figure on a shared machine."""


class Timer:
    """Wall and process CPU time from ``start()`` to ``rate(n)``."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, n: int) -> Rate:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return n / wall, cpu / n * 1e6


def kew_sink_defaults(url: str, n: int) -> Rate:
    """msg/s (and CPU us/msg) of ``q.sink(handler)`` with no arguments
    (concurrency 1, the default window) draining ``n`` messages sent
    beforehand: the figure a user gets without tuning."""
    conn = kew.connect(url)
    name = f"bench-d-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, Sample)
    items = make(n)
    try:
        for i in range(0, n, 100):
            q.send_many(items[i : i + 100])
        done = threading.Event()
        count = [0]

        def take(_: Sample) -> None:
            count[0] += 1
            if count[0] == n:
                done.set()

        timer = Timer()
        timer.start()
        sub = q.sink(take)
        done.wait(600)
        got = timer.rate(n)  # to the last message, not the stop
        sub.stop()
        return got
    finally:
        conn.delete(name)
        conn.close()


def interleave(
    label: str, n: int, rounds: int, raw: Callable[[], Rate], ours: Callable[[], Rate]
) -> str:
    """Runs ``raw`` and ``ours`` one after the other, ``rounds`` times (a
    shared, noisy machine: the ratio of neighbours is the figure), and
    returns markdown table rows, the last with the medians."""
    rows: list[tuple[Rate, Rate]] = []
    lines = []
    for i in range(rounds):
        r, k = raw(), ours()
        rows.append((r, k))
        lines.append(
            f"| {label} | {i + 1} | {r[0]:,.0f} | {k[0]:,.0f} | {k[0] / r[0]:.2f} "
            f"| {r[1]:.1f} | {k[1]:.1f} | {r[1] / k[1]:.2f} |"
        )
    mid = rounds // 2

    def median(values: list[float]) -> float:
        return sorted(values)[mid]

    lines.append(
        f"| {label} | median | {median([r[0] for r, _ in rows]):,.0f} "
        f"| {median([k[0] for _, k in rows]):,.0f} "
        f"| **{median([k[0] / r[0] for r, k in rows]):.2f}** "
        f"| {median([r[1] for r, _ in rows]):.1f} | {median([k[1] for _, k in rows]):.1f} "
        f"| **{median([r[1] / k[1] for r, k in rows]):.2f}** |"
    )
    return "\n".join(lines)


DEFAULTS_HEADER = (
    "| broker | round | raw msg/s | kew `sink(h)` msg/s | kew / raw "
    "| raw CPU us/msg | kew CPU us/msg | raw / kew CPU |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|"
)


_INSERT = "INSERT INTO m (queue, id, body, headers, avail_at) VALUES ('q', ?, ?, ?, ?)"
_HEADERS = b'{"content-type":"application/json"}'


def _now() -> int:
    return time.time_ns() // 1_000_000


def _raw_db(path: str) -> sqlite3.Connection:
    """A sqlite3 connection with kew's pragmas and a table shaped like kew's."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(
        "CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, id TEXT,"
        " body BLOB, headers BLOB, avail_at INTEGER, owner TEXT, count INTEGER DEFAULT 0);"
        "CREATE INDEX IF NOT EXISTS m_next ON m (queue, avail_at, seq);"
    )
    return db


def _raw_consume(db: sqlite3.Connection, n: int, prefetch: int, batch_delete: bool) -> None:
    """Claim ``prefetch`` rows per transaction, decode each; delete each
    (autocommit) or, with ``batch_delete``, the claimed batch in one."""
    dec = msgspec.json.Decoder(Sample)
    left = n
    while left:
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute(
            "UPDATE m SET avail_at = ?, owner = 'me', count = count + 1 WHERE seq IN "
            "(SELECT seq FROM m WHERE queue = 'q' AND avail_at <= ? ORDER BY avail_at, seq "
            "LIMIT ?) RETURNING seq, body",
            (_now() + 30000, _now(), prefetch),
        ).fetchall()
        db.execute("COMMIT")
        for seq, body in rows:
            dec.decode(body)
            if not batch_delete:
                db.execute("DELETE FROM m WHERE seq = ? AND owner = 'me'", (seq,))
        if batch_delete and rows:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM m WHERE seq = ? AND owner = 'me'", [(r[0],) for r in rows])
            db.execute("COMMIT")
        left -= len(rows)


def raw_sqlite_drain(path: str, n: int, prefetch: int = 100, batch_delete: bool = False) -> Rate:
    """msg/s (and CPU us/msg) of the raw loop draining ``n`` rows inserted
    beforehand."""
    db = _raw_db(path)
    enc = msgspec.json.Encoder()
    try:
        db.execute("DELETE FROM m")
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            _INSERT, [(str(i), enc.encode(s), _HEADERS, _now()) for i, s in enumerate(make(n))]
        )
        db.execute("COMMIT")
        db.execute("PRAGMA synchronous=NORMAL")  # kew's consumer connection does the same
        timer = Timer()
        timer.start()
        _raw_consume(db, n, prefetch, batch_delete)
        return timer.rate(n)
    finally:
        db.close()


def bench_raw_sqlite(path: str, n: int, batch: int, prefetch: int) -> dict[str, float]:
    """The same inserts/claims/deletes with sqlite3 alone."""
    db = _raw_db(path)
    enc = msgspec.json.Encoder()
    items = [enc.encode(s) for s in make(n)]
    out: dict[str, float] = {}

    def single() -> None:
        for i, body in enumerate(items[: min(n, 2000)]):
            db.execute(_INSERT, (str(i), body, _HEADERS, _now()))  # autocommit: one transaction

    out["send"] = rate(min(n, 2000), single)
    db.execute("DELETE FROM m")

    def many() -> None:
        for i in range(0, n, batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                _INSERT, [(str(j), b, _HEADERS, _now()) for j, b in enumerate(items[i : i + batch])]
            )
            db.execute("COMMIT")

    out["send_many"] = rate(n, many)
    db.execute("PRAGMA synchronous=NORMAL")  # kew's consumer connection does the same
    out["consume"] = rate(n, lambda: _raw_consume(db, n, prefetch, False))
    db.close()
    return out


def defaults(tmp: str, n: int, rounds: int) -> str:
    """``sink(h)`` with no arguments on SQLite next to the raw loop (claim
    100, delete each; and claim 100, delete the batch in one transaction)."""
    k = 0

    def ours() -> Rate:
        nonlocal k
        k += 1
        return kew_sink_defaults(f"sqlite:///{tmp}/kew-d{k}.sqlite3", n)

    return "\n".join(
        [
            DEFAULTS_HEADER,
            interleave(
                "sqlite", n, rounds, lambda: raw_sqlite_drain(f"{tmp}/raw-d.sqlite3", n), ours
            ),
            interleave(
                "sqlite (raw: batch delete)",
                n,
                rounds,
                lambda: raw_sqlite_drain(f"{tmp}/raw-b.sqlite3", n, batch_delete=True),
                ours,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", action="append", help="kew URL (repeatable); default sqlite")
    ap.add_argument("-n", type=int, default=5000, help="messages per line (send: at most 2000)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--prefetch", type=int, default=100)
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="only `sink(h)` with no arguments vs the raw loop (SQLite), interleaved",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --defaults")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kew-bench-")
    if args.defaults:
        table = f"SQLite, n={args.n} messages of 200 bytes\n\n" + defaults(tmp, args.n, args.rounds)
        print(table)
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        (results / f"defaults-sqlite-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")
        return
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
