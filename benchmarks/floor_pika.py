"""The floor under a pika-based task worker on RabbitMQ: raw pika, one thread.

    python benchmarks/floor_pika.py            # 20,000 messages, both modes
    python benchmarks/floor_pika.py -n 50000 --per-event 8

A queue is filled with N persistent messages, then drained by one thread on
one BlockingConnection, prefetch 16, in two modes:

* ``ack``:    each delivery acked at once (what a worker without status
              events does);
* ``events``: for every ``--per-event`` deliveries, one persistent message
              (a JSON array of that many task events) is published on a
              confirm-mode channel, and those deliveries are acked when its
              confirm arrives (what kew's task layer does, in the least code).

It prints (and writes to benchmarks/results/) msg/s and the process's CPU
time per message.  No kew code runs:
this is what pika and the broker cost, so kew's own overhead is the gap
between these lines and ``bench_tasks.py``'s (docs/tasks.md#throughput).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pika

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
EVENT = b'{"task_id":"0123456789abcdef0123456789abcdef","queue":"q","kind":"succeeded","at":1}'


def run(mode: str, n: int, per_event: int) -> tuple[float, float]:
    """(messages/s, CPU us per message) of one drain."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    queue = f"floor-{mode}-{os.urandom(3).hex()}"
    events = queue + ".events"
    for q in (queue, events):
        ch.queue_declare(q, durable=True)
    props = pika.BasicProperties(
        delivery_mode=2,
        message_id="0123456789abcdef",
        headers={"content-type": "application/json", "kew-type": "T", "kew-sent-at": 1},
    )
    filler = conn.channel()
    filler.confirm_delivery()
    for _ in range(n):
        filler.basic_publish("", queue, b'{"n":0}', props)

    pub = conn.channel()._impl  # confirms come to on_confirm, nobody waits
    waiting: dict[int, list[int]] = {}
    published = [0]
    handled = [0]
    batch: list[int] = []

    def on_confirm(frame: pika.frame.Method) -> None:  # type: ignore[type-arg]
        m = frame.method
        for seq in sorted(waiting):
            if seq == m.delivery_tag or (m.multiple and seq < m.delivery_tag):
                for tag in waiting.pop(seq):
                    ch._impl.basic_ack(tag)

    ready: list[bool] = []
    pub.confirm_delivery(on_confirm, callback=lambda _: ready.append(True))
    while not ready:
        conn.process_data_events(0.1)
    start: list[float] = []

    def on_message(_ch: object, method: object, _props: object, _body: bytes) -> None:
        if not start:
            start.extend((time.perf_counter(), time.process_time()))
        tag = method.delivery_tag  # type: ignore[attr-defined]
        handled[0] += 1
        if mode == "ack":
            ch._impl.basic_ack(tag)
            return
        batch.append(tag)
        if len(batch) >= per_event or handled[0] == n:
            body = b"[" + b",".join([EVENT] * len(batch)) + b"]"
            pub.basic_publish("", events, body, props)
            published[0] += 1
            waiting[published[0]] = batch[:]
            batch.clear()

    ch.basic_qos(prefetch_count=16)
    tag = ch._impl.basic_consume(queue, on_message)
    while handled[0] < n or waiting:
        conn.process_data_events(0.05)
    wall = time.perf_counter() - start[0]
    cpu = time.process_time() - start[1]
    ch._impl.basic_cancel(tag)
    for q in (queue, events):
        ch.queue_delete(q)
    conn.close()
    return n / wall, cpu / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("--per-event", type=int, default=4, help="deliveries per event message")
    args = p.parse_args()
    lines = [
        f"# Raw pika floor ({args.n} messages), {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        "",
        "| raw pika, one thread, prefetch 16 | msg/s | CPU us/msg |",
        "|---|---:|---:|",
    ]
    for mode in ("ack", "events"):
        rate, cpu = run(mode, args.n, args.per_event)
        label = (
            "ack each"
            if mode == "ack"
            else f"one event message per {args.per_event}, ack on confirm"
        )
        lines.append(f"| {label} | {rate:,.0f} | {cpu:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"floor-{datetime.now(UTC):%Y%m%d-%H%M}.md").write_text(text)


if __name__ == "__main__":
    main()
