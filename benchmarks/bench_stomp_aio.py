"""kew.aio on STOMP (the native route, ``StompConnector.aio()``) next to the
sync API and to the thread bridge on the same broker, in one run.

    python benchmarks/bench_stomp_aio.py [-n 20000] [--repeat 2] [--no-activemq] [--no-rabbitmq]
                                          [--url ...]

Brokers: an ActiveMQ of the bench's own (tests/brokers/activemq.py: KahaDB,
journal synced on every write), RabbitMQ-STOMP on 127.0.0.1:61613 when it
answers, any --url.  n messages of ~200 bytes (the harness's Sample):

  async send       1,000 concurrent ``await q.send(v)`` (a semaphore of
                   1,000), each returning once its RECEIPT came; next to the
                   sync ``send_many`` in batches of 1,000 (the ratio), and to
                   the same 1,000 concurrent sends through the thread bridge
                   (its 16 threads, each waiting a receipt; 5,000 messages)
  async consume    ``async with q.sink(handler, concurrency=8)`` draining them
                   next to the sync sink with 8 threads
  loop lag         during each async line, a task sleeping 1 ms in a loop:
                   the worst delay of its timer and the 99th percentile, in
                   ms (the bound: < 20 ms); the row "send+consume" is the
                   worst over the whole n-message send and consume run, next
                   to an idle loop's (2 s, the same probe: the machine's share)
  wake-ups         ``call_soon_threadsafe`` the receipts took (batched)

``--repeat N`` runs the send lines N times alternately (the best rate, the
worst lag).  Writes a markdown table to stdout and benchmarks/results/stomp_aio.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_aio import Lag, async_consume, concurrent_sends, sync_consume, worst
from harness import Sample, make

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kew  # noqa: E402
import kew.aio  # noqa: E402
from kew.aio._bridge import BridgeConnector  # noqa: E402
from kew.testing.util import port_open  # noqa: E402
from kew_artemis._aio_link import Wakes  # noqa: E402

WAVE = 1000


def sync_send_many(q: kew.Queue[Sample], items: list[Sample]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(items), WAVE):
        q.send_many(items[i : i + WAVE])
    return len(items) / (time.perf_counter() - t0)


async def run(url: str, n: int, repeat: int) -> list[str]:
    items = make(n)
    gc.collect()
    gc.freeze()  # the benchmark's own values: not the loop lag measured
    rows: list[str] = []
    conn = kew.aio.connect(url)
    assert kew.aio.route(conn) == "native", conn
    sync = kew.connect(url)
    bridge = BridgeConnector(kew.connect(url), 16)
    name = f"bench-saio-{os.urandom(3).hex()}"
    q = kew.aio.Queue(conn, name, Sample)
    sq = kew.Queue(sync, name, Sample)
    bq = kew.aio.Queue(bridge, name, Sample)
    await conn.declare(name)
    try:
        best = bbest = sbest = 0.0
        run_lag = send_lag = (0.0, 0.0)
        wakes = Wakes.of(asyncio.get_running_loop())
        wakeups = 0
        for _ in range(repeat):
            sbest = max(sbest, await asyncio.to_thread(sync_send_many, sq, items))
            await asyncio.to_thread(sq.browser().purge)
            async with Lag() as lag:
                w0 = wakes.wakeups
                t0 = time.perf_counter()
                await concurrent_sends(q, items)
                took = time.perf_counter() - t0
                wakeups = wakes.wakeups - w0
            best, send_lag = max(best, n / took), worst(send_lag, lag.ms)
            await asyncio.to_thread(sq.browser().purge)
            few = items[: min(n, 5000)]  # the bridge is slow: fewer
            t0 = time.perf_counter()
            await concurrent_sends(bq, few)
            bbest = max(bbest, len(few) / (time.perf_counter() - t0))
            await asyncio.to_thread(sq.browser().purge)
        async with Lag() as idle:  # the machine's own: the loop doing nothing
            await asyncio.sleep(2)
        # the n-message async send + consume run, one probe throughout
        async with Lag() as whole:
            t0 = time.perf_counter()
            await concurrent_sends(q, items)
            t1 = time.perf_counter()
            await async_consume(q, n)
            t2 = time.perf_counter()
        run_lag = whole.ms
        consume = n / (t2 - t1)
        await asyncio.to_thread(sync_send_many, sq, items)
        sync_rate = await asyncio.to_thread(sync_consume, sq, n)
        load = os.getloadavg()[0]
        rows += [
            f"| {url} | async send x1000 (native) | {best:,.0f} | sync send_many 1000: "
            f"{sbest:,.0f} | {best / sbest:.2f} | {send_lag[0]:.1f} / {send_lag[1]:.1f} | "
            f"{wakeups} wake-ups for {n} receipts; load {load:.1f} |",
            f"| {url} | async send x1000 (bridge) | {bbest:,.0f} | native: {best:,.0f} | "
            f"{bbest / best:.2f} | | 16 threads |",
            f"| {url} | async consume c=8 (native) | {consume:,.0f} | sync sink c=8: "
            f"{sync_rate:,.0f} | {consume / sync_rate:.2f} | | ACKs not receipted (as sync) |",
            f"| {url} | send+consume {n} (native) | {n / (t2 - t0):,.0f} | | | "
            f"{run_lag[0]:.1f} / {run_lag[1]:.1f} | whole run; idle loop, 2 s: "
            f"{idle.ms[0]:.1f} / {idle.ms[1]:.1f}; load {load:.1f} |",
        ]
    finally:
        await conn.delete(name)
        await bridge.close()
        await conn.close()
        sync.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--url", action="append", default=[])
    ap.add_argument("--no-activemq", action="store_true")
    ap.add_argument("--no-rabbitmq", action="store_true")
    args = ap.parse_args()
    urls = list(args.url)
    server = None
    if not args.no_rabbitmq and port_open("127.0.0.1", 61613):
        urls.append("stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq")
    if not args.no_activemq:
        from tests.brokers.activemq import ActiveMQServer

        if ActiveMQServer.available():
            server = ActiveMQServer(Path(tempfile.mkdtemp(prefix="bench-saio-")))
            server.start()
            urls.insert(0, server.url.split("&")[0])
    header = [
        "| broker | line | msg/s | reference msg/s | ratio | loop lag max / p99 ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: list[str] = []
    try:
        for url in urls:
            rows += asyncio.run(run(url, args.n, args.repeat))
    finally:
        if server is not None:
            server.kill()
    out = "\n".join(header + rows)
    print(out)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "stomp_aio.md").write_text(out + "\n")


if __name__ == "__main__":
    main()
