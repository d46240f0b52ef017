"""kew_redis next to raw redis-py doing the same work, in one run.

    python benchmarks/bench_redis.py [-n 20000] [--url redis://127.0.0.1:6379/14]

Lines: XADD one at a time vs ``send``; pipelined XADD (batches of 100) vs
``send_many``; XREADGROUP (COUNT 100) + XACK + XDEL per message vs a kew sink
(prefetch 100, ack per message).  200-byte messages.  Writes a markdown table.

With --defaults: only ``q.sink(h)`` with no arguments next to redis-py's fast
loop (XREADGROUP COUNT 100, one XACK + XDEL per batch), --rounds times
interleaved.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import msgspec
import redis
from harness import (
    DEFAULTS_HEADER,
    Rate,
    Sample,
    Timer,
    bench_kew,
    interleave,
    kew_sink_defaults,
    make,
)


def raw(url: str, n: int, batch: int) -> dict[str, float]:
    r = redis.Redis.from_url(url.split("?")[0])
    key = f"rawbench-{os.urandom(3).hex()}"
    enc = msgspec.json.Encoder()
    bodies = [enc.encode(s) for s in make(n)]
    headers = b'{"content-type":"application/json"}'
    out: dict[str, float] = {}
    try:
        single = min(n, 5000)
        t0 = time.perf_counter()
        for i in range(single):
            r.xadd(key, {"id": str(i), "body": bodies[i], "headers": headers})
        out["send"] = single / (time.perf_counter() - t0)
        r.delete(key)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            p = r.pipeline(transaction=False)
            for j in range(i, min(i + batch, n)):
                p.xadd(key, {"id": str(j), "body": bodies[j], "headers": headers})
            p.execute()
        out["send_many"] = n / (time.perf_counter() - t0)
        r.xgroup_create(key, "g", "0")
        dec = msgspec.json.Decoder(Sample)
        t0 = time.perf_counter()
        left = n
        while left:
            reply = r.xreadgroup("g", "c", {key: ">"}, count=batch, block=1000)
            for entry_id, fields in reply[0][1]:
                dec.decode(fields[b"body"])
                p = r.pipeline(transaction=True)
                p.xack(key, "g", entry_id)
                p.xdel(key, entry_id)
                p.execute()
                left -= 1
        out["consume"] = n / (time.perf_counter() - t0)
    finally:
        r.delete(key)
    return out


def raw_drain(url: str, n: int, batch: int = 100) -> Rate:
    """msg/s of redis-py's fast loop draining ``n`` entries added
    beforehand: XREADGROUP COUNT ``batch``, decode each, then one XACK (and
    XDEL, as kew keeps the stream short) for the batch."""
    r = redis.Redis.from_url(url.split("?")[0])
    key = f"rawbench-d-{os.urandom(3).hex()}"
    enc = msgspec.json.Encoder()
    headers = b'{"content-type":"application/json"}'
    try:
        p = r.pipeline(transaction=False)
        for i, s in enumerate(make(n)):
            p.xadd(key, {"id": str(i), "body": enc.encode(s), "headers": headers})
        p.execute()
        r.xgroup_create(key, "g", "0")
        dec = msgspec.json.Decoder(Sample)
        timer = Timer()
        timer.start()
        left = n
        while left:
            reply = r.xreadgroup("g", "c", {key: ">"}, count=batch, block=1000)
            ids = []
            for entry_id, fields in reply[0][1]:
                dec.decode(fields[b"body"])
                ids.append(entry_id)
            p = r.pipeline(transaction=False)
            p.xack(key, "g", *ids)
            p.xdel(key, *ids)
            p.execute()
            left -= len(ids)
        return timer.rate(n)
    finally:
        r.delete(key)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/14")
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="only `sink(h)` with no arguments vs redis-py's fast loop, interleaved",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --defaults")
    args = ap.parse_args()
    if args.defaults:
        rows = interleave(
            "redis",
            args.n,
            args.rounds,
            lambda: raw_drain(args.url, args.n),
            lambda: kew_sink_defaults(args.url, args.n),
        )
        table = f"Redis, n={args.n} messages of 200 bytes\n\n{DEFAULTS_HEADER}\n{rows}"
        print(table)
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        (out / f"defaults-redis-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")
        return
    base = raw(args.url, args.n, 100)
    ours = bench_kew(args.url, args.n, 100, 100)
    lines = [
        f"kew_redis vs raw redis-py, n={args.n}, 200-byte messages, {args.url}",
        "",
        "| line | raw redis-py msg/s | kew msg/s | kew / raw |",
        "|---|---:|---:|---:|",
    ]
    for k in ("send", "send_many", "consume"):
        lines.append(f"| {k} | {base[k]:,.0f} | {ours[k]:,.0f} | {ours[k] / base[k]:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"redis-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
