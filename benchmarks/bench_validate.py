"""The cost of checking a send against the queue's type (the producer-side
validation of ``Queue.send``), as a share of a SQLite send.

    python benchmarks/bench_validate.py -n 5000

Lines, per message of ~200 bytes (the harness's Sample):
  sqlite send   one ``Queue.send`` (validated, durable before it returns)
  encode        the codec's encode alone
  validate      the extra work validation does: a decode of the encoded body
The figure that counts: validate / sqlite send (target < 5 %).
Writes a markdown table to stdout and to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import Sample, make  # type: ignore[import-not-found]

import kew
from kew.qchan.codec import JsonCodec


def per_call(fn: object, items: list[Sample]) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)  # type: ignore[operator]
    return (time.perf_counter() - start) / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5000)
    args = parser.parse_args()
    items = make(args.n)
    codec = JsonCodec(Sample)
    bodies = {id(i): codec.encode(i) for i in items}
    with tempfile.TemporaryDirectory() as tmp:
        conn = kew.connect(f"sqlite:///{tmp}/v.sqlite3")
        q = kew.Queue(conn, "validate", Sample)
        send = per_call(q.send, items)
        conn.close()
    encode = per_call(codec.encode, items)
    validate = per_call(lambda i: codec.decode(bodies[id(i)]), items)
    rows = [
        ("sqlite send (validated)", send, 1.0),
        ("encode", encode, encode / send),
        ("validate (decode)", validate, validate / send),
    ]
    table = ["| line | µs per message | share of a send |", "|---|---:|---:|"]
    table += [f"| {name} | {us:.2f} | {share:.1%} |" for name, us, share in rows]
    text = "\n".join(table)
    print(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "validate.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
