"""kew_redis next to raw redis-py doing the same work, in one run.

    python benchmarks/bench_redis.py [-n 20000] [--url redis://127.0.0.1:6379/14]

Lines: XADD one at a time vs ``send``; pipelined XADD (batches of 100) vs
``send_many``; XREADGROUP (COUNT 100) + XACK + XDEL per message vs a kew sink
(prefetch 100, ack per message).  200-byte messages.  Writes a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import msgspec
import redis
from harness import Sample, bench_kew, make


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/14")
    args = ap.parse_args()
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
