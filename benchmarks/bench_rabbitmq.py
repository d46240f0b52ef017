"""kew_rabbitmq next to raw pika doing the same work, and next to Dramatiq
and Celery moving no-op messages, in one run.

    python benchmarks/bench_rabbitmq.py [-n 20000] [--e2e 10000] [--url amqp://...]

Same settings on both sides: durable queue, persistent 200-byte messages,
publisher confirms, prefetch 100, one ack per message.  Lines:

- send: one publish, then wait for its confirm (raw: ``confirm_delivery``
  channel, ``basic_publish(mandatory=True)``) vs ``Queue.send``;
- send_many: batches of 100, every message confirmed before the call
  returns: pipelined confirms (raw: 100 publishes on pika's channel under
  a confirm-mode BlockingChannel, then wait for the 100 confirms) vs
  ``Queue.send_many`` (``batch=pipeline``, the default);
- send_many_tx: the same in AMQP transactions (raw: ``tx_select`` / 100
  publishes / ``tx_commit``) vs ``Queue.send_many`` with ``batch=tx``;
- consume: basic_consume (prefetch 100), decode, ack each message vs a kew
  sink (prefetch 100);
- end to end: N no-op messages already queued, drained by a worker process
  with 8 threads: a kew sink (``concurrency=8``, prefetch 16), Dramatiq
  (``RabbitmqBroker``, ``--processes 1 --threads 8``, its default prefetch
  16) and Celery (amqp, ``-P threads -c 8``, acks late); rate = N / (last
  handled - first handled), worker start-up excluded.  Dramatiq and Celery
  run through benchmarks/bench_tasks.py's driver.

Writes a markdown table to stdout and benchmarks/results/rabbitmq-<date>.md.

With --defaults: only ``q.sink(h)`` with no arguments next to raw pika's
consume (prefetch 100, an ack each), --rounds times interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pika
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

import kew

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = 8


def raw(url: str, n: int, batch: int, prefetch: int) -> dict[str, float]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    key = f"rawbench-{os.urandom(3).hex()}"
    ch.queue_declare(key, durable=True, arguments={"x-queue-type": "classic"})
    enc = msgspec.json.Encoder()
    bodies = [enc.encode(s) for s in make(n)]
    props = [
        pika.BasicProperties(
            message_id=str(i),
            headers={"content-type": "application/json"},
            delivery_mode=2,
            content_type="application/json",
        )
        for i in range(n)
    ]
    out: dict[str, float] = {}
    try:
        confirm = conn.channel()
        confirm.confirm_delivery()
        single = min(n, 5000)
        t0 = time.perf_counter()
        for i in range(single):
            confirm.basic_publish("", key, bodies[i], props[i], mandatory=True)
        out["send"] = single / (time.perf_counter() - t0)
        ch.queue_purge(key)
        out["send_many"] = n / pipelined(conn, key, bodies, props, batch)
        tx = conn.channel()
        tx.tx_select()
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            for j in range(i, min(i + batch, n)):
                tx.basic_publish("", key, bodies[j], props[j])
            tx.tx_commit()
        out["send_many_tx"] = n / (time.perf_counter() - t0)
        dec = msgspec.json.Decoder(Sample)
        cons = conn.channel()
        cons.basic_qos(prefetch_count=prefetch)
        left = [n]

        def on_message(c: object, method: object, _p: object, body: bytes) -> None:
            dec.decode(body)
            cons.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
            left[0] -= 1
            if left[0] == 0:
                cons.stop_consuming()

        t0 = time.perf_counter()
        cons.basic_consume(key, on_message)
        cons.start_consuming()
        out["consume"] = n / (time.perf_counter() - t0)
    finally:
        ch.queue_delete(key)
        conn.close()
    return out


def raw_drain(url: str, n: int, prefetch: int = 100) -> Rate:
    """msg/s of raw pika draining ``n`` persistent messages sent beforehand:
    basic_consume with prefetch ``prefetch``, decode, one ack per message."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    key = f"rawbench-d-{os.urandom(3).hex()}"
    ch.queue_declare(key, durable=True, arguments={"x-queue-type": "classic"})
    enc = msgspec.json.Encoder()
    bodies = [enc.encode(s) for s in make(n)]
    props = [
        pika.BasicProperties(
            message_id=str(i),
            headers={"content-type": "application/json"},
            delivery_mode=2,
            content_type="application/json",
        )
        for i in range(n)
    ]
    try:
        pipelined(conn, key, bodies, props, 100)
        dec = msgspec.json.Decoder(Sample)
        cons = conn.channel()
        cons.basic_qos(prefetch_count=prefetch)
        left = [n]

        def on_message(c: object, method: object, _p: object, body: bytes) -> None:
            dec.decode(body)
            cons.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
            left[0] -= 1
            if left[0] == 0:
                cons.stop_consuming()

        timer = Timer()
        timer.start()
        cons.basic_consume(key, on_message)
        cons.start_consuming()
        return timer.rate(n)
    finally:
        ch.queue_delete(key)
        conn.close()


def pipelined(
    conn: pika.BlockingConnection,
    key: str,
    bodies: list[bytes],
    props: list[pika.BasicProperties],
    batch: int,
) -> float:
    """Batches on a confirm channel: publish all, then wait for all the
    confirms (BlockingChannel waits per message, so pika's channel under it
    is used, as a pika user would).  Returns the seconds taken."""
    impl = conn.channel()._impl
    state = {"ready": False, "confirmed": 0, "wake": False}

    def on_confirm(frame: Any) -> None:
        assert isinstance(frame.method, pika.spec.Basic.Ack), "nacked"
        state["confirmed"] = frame.method.delivery_tag  # in order, one channel
        conn.add_callback_threadsafe(lambda: None)

    def on_ready(_: Any) -> None:
        state["ready"] = True
        conn.add_callback_threadsafe(lambda: None)

    impl.confirm_delivery(on_confirm, callback=on_ready)
    while not state["ready"]:
        conn.process_data_events(time_limit=1)
    t0 = time.perf_counter()
    seq = 0
    for i in range(0, len(bodies), batch):
        for j in range(i, min(i + batch, len(bodies))):
            impl.basic_publish("", key, bodies[j], props[j], mandatory=True)
            seq += 1
        while state["confirmed"] < seq:
            conn.process_data_events(time_limit=1)
    return time.perf_counter() - t0


def kew_tx(url: str, n: int, batch: int) -> float:
    """kew's send_many with batch=tx."""
    sep = "&" if "?" in url else "?"
    conn = kew.connect(f"{url}{sep}batch=tx")
    name = f"bench-tx-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, Sample)
    items = make(n)
    try:
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            q.send_many(items[i : i + batch])
        return n / (time.perf_counter() - t0)
    finally:
        conn.delete(name)
        conn.close()


# -- end to end: a kew worker process draining no-op messages ---------------------------


class Noop(msgspec.Struct):
    n: int = 0


def kew_worker(url: str, queue: str, n: int, out: Path) -> None:
    """The worker process: a sink with 8 threads, a no-op handler that notes
    the time of the first and the last message."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # all threads
    lock = threading.Lock()
    seen = [0, 0.0]

    def handle(_: Noop) -> None:
        with lock:
            seen[0] += 1
            if seen[0] == 1:
                seen[1] = time.time()
            if seen[0] == n:
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"first": seen[1], "last": time.time()}))
                tmp.rename(out)

    q = kew.Queue(kew.connect(url), queue, Noop)
    with q.sink(handle, concurrency=THREADS, prefetch=2 * THREADS):
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


def kew_e2e(url: str, n: int, tmp: Path) -> float:
    queue = f"bench-e2e-{os.urandom(3).hex()}"
    out = tmp / f"{queue}.json"
    conn = kew.connect(url)
    q = kew.Queue(conn, queue, Noop)
    try:
        for i in range(0, n, 100):
            q.send_many([Noop(j) for j in range(i, min(i + 100, n))])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        args = [sys.executable, __file__, "--worker", url, queue, str(n), str(out)]
        proc = subprocess.Popen(args, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + max(120, n / 50)
            while not out.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"kew worker exited {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kew worker did not finish {n} messages in time")
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
        res = json.loads(out.read_text())
        return float(n / (res["last"] - res["first"]))
    finally:
        conn.delete(queue)
        conn.close()


def others_e2e(url: str, n: int, tmp: Path) -> dict[str, float]:
    os.environ["BENCH_AMQP_URL"] = url
    import bench_tasks

    bench_tasks.URLS["rabbitmq"] = url
    return {s: bench_tasks.run_one(s, "rabbitmq", n, tmp)["tasks"] for s in ("dramatiq", "celery")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--e2e", type=int, default=10000, help="messages for the end-to-end line")
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="only `sink(h)` with no arguments vs raw pika (prefetch 100), interleaved",
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --defaults")
    args = ap.parse_args()
    if args.worker:
        url, queue, n, out = args.worker
        kew_worker(url, queue, int(n), Path(out))
        return
    if args.defaults:
        rows = interleave(
            "rabbitmq",
            args.n,
            args.rounds,
            lambda: raw_drain(args.url, args.n),
            lambda: kew_sink_defaults(args.url, args.n),
        )
        table = f"RabbitMQ, n={args.n} messages of 200 bytes\n\n{DEFAULTS_HEADER}\n{rows}"
        print(table)
        (HERE / "results").mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (HERE / "results" / f"defaults-rabbitmq-{stamp}.md").write_text(table + "\n")
        return
    base = raw(args.url, args.n, 100, 100)
    ours = bench_kew(args.url, args.n, 100, 100)
    ours["send_many_tx"] = kew_tx(args.url, args.n, 100)
    with tempfile.TemporaryDirectory() as tmp:
        e2e = {"kew": kew_e2e(args.url, args.e2e, Path(tmp))}
        e2e.update(others_e2e(args.url, args.e2e, Path(tmp)))
    lines = [
        f"kew_rabbitmq vs raw pika {pika.__version__}, n={args.n}, 200-byte persistent "
        f"messages, confirms, prefetch 100, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs",
        "",
        "| line | raw pika msg/s | kew msg/s | kew / raw |",
        "|---|---:|---:|---:|",
    ]
    for k in ("send", "send_many", "send_many_tx", "consume"):
        lines.append(f"| {k} | {base[k]:,.0f} | {ours[k]:,.0f} | {ours[k] / base[k]:.2f} |")
    lines.append(
        f"| send_many / send | {base['send_many'] / base['send']:.1f}x | "
        f"{ours['send_many'] / ours['send']:.1f}x | |"
    )
    lines += [
        "",
        f"End to end: {args.e2e} no-op messages drained by a worker process, {THREADS} threads",
        "",
        "| system | msg/s | vs Dramatiq |",
        "|---|---:|---:|",
    ]
    for k in ("kew", "dramatiq", "celery"):
        lines.append(f"| {k} | {e2e[k]:,.0f} | {e2e[k] / e2e['dramatiq']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"rabbitmq-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
