"""kew_artemis next to raw stomp.py doing the same work on the same broker, in one run.

    python benchmarks/bench_artemis.py [-n 10000] [--url stomp://...] [--no-activemq]

Brokers: an ActiveMQ of the bench's own (tests/brokers/activemq.py: KahaDB,
journal synced on every write), plus RabbitMQ-STOMP on 127.0.0.1:61613 when
it answers, plus any --url.  Lines, 200-byte messages:
  send       persistent SEND awaiting its RECEIPT, one at a time, vs ``send``
  send_many  batches of 100 SENDs, then await the 100 receipts, vs ``send_many``
             (every message still receipted); on ActiveMQ (kew's batch=tx) both
             send the 100 in a STOMP transaction and await the COMMIT's receipt
  consume    client-individual subscription (prefetch 100), ACK per message,
             vs a kew sink (prefetch 100)
Writes a markdown table to stdout and benchmarks/results/.

With --defaults (RabbitMQ-STOMP unless --url): only ``q.sink(h)`` with no
arguments next to the raw client-individual consume (prefetch 100),
--rounds times interleaved.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import stomp
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kew_artemis.provider import Options, destination, subscribe_headers  # noqa: E402


class _Raw(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.receipts: set[str] = set()
        self.on_msg: Any = None

    def on_receipt(self, frame: Any) -> None:
        with self.cond:
            self.receipts.add(frame.headers["receipt-id"])
            self.cond.notify_all()

    def on_message(self, frame: Any) -> None:
        if self.on_msg is not None:
            self.on_msg(frame)

    def wait(self, ids: list[str]) -> None:
        with self.cond:
            while not all(i in self.receipts for i in ids):
                self.cond.wait(10)
            self.receipts.difference_update(ids)


def _connect(o: Options) -> tuple[Any, _Raw]:
    host = o.hosts[0]
    conn = stomp.Connection12(
        [host],
        heartbeats=(o.heartbeat, o.heartbeat),
        auto_decode=False,
        vhost="/" if o.dialect == "rabbitmq" else host[0],
    )
    listener = _Raw()
    conn.set_listener("raw", listener)
    conn.connect(o.login, o.passcode, wait=True)
    # as kew does: no Nagle (else each batch waits for a delayed ACK)
    conn.transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, listener


def raw(url: str, n: int, batch: int, prefetch: int) -> dict[str, float]:
    """The same work with stomp.py alone."""
    o = Options.from_url(url)
    dest = destination(o.dialect, f"rawbench-{os.urandom(3).hex()}")
    enc = msgspec.json.Encoder()
    bodies = [enc.encode(s) for s in make(n)]
    headers = {"persistent": "true", "content-type": "application/json"}
    if o.dialect == "artemis":
        headers["destination-type"] = "ANYCAST"
    conn, listener = _connect(o)
    out: dict[str, float] = {}
    seq = iter(range(10**9))
    try:
        single = min(n, 5000)
        t0 = time.perf_counter()
        for i in range(single):
            rid = f"r{next(seq)}"
            conn.send(dest, bodies[i], headers={**headers, "receipt": rid})
            listener.wait([rid])
        out["send"] = single / (time.perf_counter() - t0)
        _drain(conn, listener, dest, single, o.dialect)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            ids = []
            if o.batch == "tx":  # as kew does on ActiveMQ: one receipted COMMIT
                tx = f"t{next(seq)}"
                conn.begin(tx)
                for j in range(i, min(i + batch, n)):
                    conn.send(dest, bodies[j], headers={**headers, "transaction": tx})
                ids.append(f"r{next(seq)}")
                conn.commit(tx, headers={"receipt": ids[-1]})
            else:
                for j in range(i, min(i + batch, n)):
                    rid = f"r{next(seq)}"
                    conn.send(dest, bodies[j], headers={**headers, "receipt": rid})
                    ids.append(rid)
            listener.wait(ids)
        out["send_many"] = n / (time.perf_counter() - t0)
        dec = msgspec.json.Decoder(Sample)
        done = threading.Event()
        count = [0]

        def on_msg(frame: Any) -> None:
            dec.decode(frame.body)
            conn.ack(frame.headers["ack"])
            count[0] += 1
            if count[0] == n:
                done.set()

        listener.on_msg = on_msg
        t0 = time.perf_counter()
        conn.subscribe(dest, id="c", ack="client-individual",
                       headers=subscribe_headers(o.dialect, prefetch))  # fmt: skip
        done.wait(600)
        out["consume"] = n / (time.perf_counter() - t0)
        conn.unsubscribe("c")
    finally:
        conn.disconnect()
    return out


def raw_drain(url: str, n: int, prefetch: int = 100) -> Rate:
    """msg/s of raw stomp.py draining ``n`` persistent messages sent
    beforehand: a client-individual subscription (prefetch ``prefetch``),
    decode, one ACK per message."""
    o = Options.from_url(url)
    dest = destination(o.dialect, f"rawbench-d-{os.urandom(3).hex()}")
    enc = msgspec.json.Encoder()
    headers = {"persistent": "true", "content-type": "application/json"}
    if o.dialect == "artemis":
        headers["destination-type"] = "ANYCAST"
    conn, listener = _connect(o)
    try:
        bodies = [enc.encode(s) for s in make(n)]
        for i in range(0, n, 100):
            ids = []
            for j in range(i, min(i + 100, n)):
                rid = f"d{j}"
                conn.send(dest, bodies[j], headers={**headers, "receipt": rid})
                ids.append(rid)
            listener.wait(ids)
        dec = msgspec.json.Decoder(Sample)
        done = threading.Event()
        count = [0]

        def on_msg(frame: Any) -> None:
            dec.decode(frame.body)
            conn.ack(frame.headers["ack"])
            count[0] += 1
            if count[0] == n:
                done.set()

        listener.on_msg = on_msg
        timer = Timer()
        timer.start()
        conn.subscribe(dest, id="c", ack="client-individual",
                       headers=subscribe_headers(o.dialect, prefetch))  # fmt: skip
        done.wait(600)
        got = timer.rate(n)
        conn.unsubscribe("c")
        return got
    finally:
        conn.disconnect()


def _drain(conn: Any, listener: _Raw, dest: str, n: int, dialect: str) -> None:
    done = threading.Event()
    count = [0]

    def on_msg(frame: Any) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    listener.on_msg = on_msg
    conn.subscribe(dest, id="drain", ack="auto", headers=subscribe_headers(dialect, 1000))
    done.wait(120)
    conn.unsubscribe("drain")
    listener.on_msg = None


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--url", action="append", default=[])
    ap.add_argument("--no-activemq", action="store_true")
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="only `sink(h)` with no arguments vs raw stomp.py (prefetch 100), interleaved",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --defaults")
    args = ap.parse_args()
    urls = list(args.url)
    server = None
    if args.defaults and not urls:
        urls = ["stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq"]
        args.no_activemq = True
    if not args.no_activemq:
        from tests.brokers.activemq import ActiveMQServer

        server = ActiveMQServer(Path(tempfile.mkdtemp(prefix="kew-bench-amq-")))
        server.start()
        urls.insert(0, f"stomp://127.0.0.1:{server.port}/?dialect=activemq")
    if _reachable(61613) and not any("61613" in u for u in urls):
        urls.append("stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq")
    lines = [
        f"kew_artemis vs raw stomp.py, n={args.n}, 200-byte persistent messages, "
        "batch=100, prefetch=100",
        "",
        "| broker | line | raw stomp.py msg/s | kew msg/s | kew / raw | kew / raw send |",
        "|---|---|---:|---:|---:|---:|",
    ]
    if args.defaults:
        try:
            parts = [f"STOMP, n={args.n} messages of 200 bytes", "", DEFAULTS_HEADER]
            for url in urls:
                dialect = Options.from_url(url).dialect
                parts.append(
                    interleave(
                        dialect,
                        args.n,
                        args.rounds,
                        lambda u=url: raw_drain(u, args.n),  # type: ignore[misc]
                        lambda u=url: kew_sink_defaults(u, args.n),  # type: ignore[misc]
                    )
                )
        finally:
            if server is not None:
                server.kill()
        table = "\n".join(parts)
        print(table)
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        (out / f"defaults-stomp-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")
        return
    try:
        for url in urls:
            base = raw(url, args.n, 100, 100)
            ours = bench_kew(url, args.n, 100, 100)
            dialect = Options.from_url(url).dialect
            for k in ("send", "send_many", "consume"):
                lines.append(
                    f"| {dialect} | {k} | {base[k]:,.0f} | {ours[k]:,.0f} | "
                    f"{ours[k] / base[k]:.2f} | {ours[k] / base['send']:.1f} |"
                )
    finally:
        if server is not None:
            server.kill()
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"artemis-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
