"""kew.aio on each provider, next to the same provider's sync API in one run.

    python benchmarks/bench_aio.py [-n 20000] [--providers memory,sqlite,redis,rabbitmq]

Per provider (its route, native or the thread bridge, is printed), n
messages of ~200 bytes (the harness's Sample):

  async send      1,000 concurrent ``await q.send(v)`` (a semaphore of
                  1,000: a new send starts as one returns), against the
                  sync ``send_many`` in batches of 1,000: the ratio
  async consume   ``async with q.sink(handler, concurrency=8)`` draining
                  those messages, against the sync sink with 8 threads
  loop lag        during each async line, a task sleeping 1 ms in a loop:
                  the worst delay of its timer, in ms (the bound: < 20 ms),
                  and the 99th percentile of the delays

memory:// is the floor: no I/O and no thread, so its loop lag is what the
1,000 coroutines make by themselves (each encodes and checks its value on
the loop; a turn of the loop runs every one that is ready).
On SQLite also the transactions the async sends took (group commit), and
sync ``send`` from 16 threads (each returns once its own message is
committed) with its transactions.  On Redis also the reference: a
redis.asyncio loop doing XADD of the same entries in pipelines of 1,000.
Writes a markdown table to stdout and to benchmarks/results/aio.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from harness import Sample, make

import kew
import kew.aio
from kew.testing.util import port_open

WAVE = 1000  # sends in flight, and the sync batch
CONCURRENCY = 8


class Lag:
    """The delays of a 1 ms timer on the running loop, while it runs."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            self.delays.append(max(0.0, loop.time() - t0 - 0.001))

    async def __aenter__(self) -> Lag:
        self._task = asyncio.create_task(self._probe())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def ms(self) -> tuple[float, float]:
        """The worst delay and the 99th percentile, in ms."""
        if not self.delays:
            return 0.0, 0.0
        ordered = sorted(self.delays)
        return ordered[-1] * 1000, ordered[int(len(ordered) * 0.99)] * 1000


async def timed(fn: Callable[[], Awaitable[None]]) -> tuple[float, tuple[float, float]]:
    """Seconds ``fn`` took, and the loop lag meanwhile (worst, p99; ms)."""
    async with Lag() as lag:
        t0 = time.perf_counter()
        await fn()
        took = time.perf_counter() - t0
    return took, lag.ms


async def concurrent_sends(q: kew.aio.Queue[Sample], items: list[Sample]) -> None:
    """Every item sent with its own ``await q.send``, ``WAVE`` at a time."""
    room = asyncio.Semaphore(WAVE)
    tasks: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        room.release()
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]

    for item in items:
        await room.acquire()
        task = asyncio.create_task(q.send(item))
        tasks.add(task)
        task.add_done_callback(done)
    while tasks:
        await asyncio.wait(set(tasks))
    if failed:
        raise failed[0]


async def async_consume(q: kew.aio.Queue[Sample], n: int) -> None:
    count = [0]
    all_in = asyncio.Event()

    async def take(_: Sample) -> None:
        count[0] += 1
        if count[0] == n:
            all_in.set()

    async with q.sink(take, concurrency=CONCURRENCY):
        async with asyncio.timeout(600):
            await all_in.wait()


def sync_consume(q: kew.Queue[Sample], n: int) -> float:
    count = [0]
    lock = threading.Lock()
    all_in = threading.Event()

    def take(_: Sample) -> None:
        with lock:
            count[0] += 1
            if count[0] == n:
                all_in.set()

    t0 = time.perf_counter()
    with q.sink(take, concurrency=CONCURRENCY):
        if not all_in.wait(600):
            raise TimeoutError(f"the sync sink took {count[0]} of {n} in 600 s")
        took = time.perf_counter() - t0  # to the last message, not the stop
    return n / took


def sync_threads(q: kew.Queue[Sample], items: list[Sample], threads: int) -> float:
    share = len(items) // threads

    def work(part: list[Sample]) -> None:
        for item in part:
            q.send(item)

    workers = [
        threading.Thread(target=work, args=(items[i * share : (i + 1) * share],))
        for i in range(threads)
    ]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return share * threads / (time.perf_counter() - t0)


Row = tuple[str, str, float, str, float | None, tuple[float, float] | None, str]


def bench(label: str, url: str, n: int) -> list[Row]:
    """The lines of one provider: (provider, line, msg/s, reference line,
    reference msg/s, max loop lag ms, note)."""
    items = make(n)
    name = f"bench-aio-{os.urandom(3).hex()}"
    sync_conn = kew.connect(url)
    sq = kew.Queue(sync_conn, name, Sample)
    rows: list[Row] = []
    try:
        sq.declare()
        # the sync reference first: send_many in batches, then the sync sink
        t0 = time.perf_counter()
        for i in range(0, n, WAVE):
            sq.send_many(items[i : i + WAVE])
        sync_send = n / (time.perf_counter() - t0)
        sync_sink = sync_consume(sq, n)

        async def run_async() -> tuple[
            str, float, tuple[float, float], float, tuple[float, float], str
        ]:
            conn = kew.aio.connect(url)
            route = kew.aio.route(conn)
            q = kew.aio.Queue(conn, name, Sample)
            await q.declare()
            group = getattr(conn, "group", None)
            before = group.transactions if group is not None else 0
            took, send_lag = await timed(lambda: concurrent_sends(q, items))
            note = ""
            if group is not None:
                note = f"{group.transactions - before:,} transactions for {n:,} sends"
            consumed, consume_lag = await timed(lambda: async_consume(q, n))
            await q.close()
            await conn.close()
            return route, n / took, send_lag, n / consumed, consume_lag, note

        route, async_send, send_lag, async_sink, sink_lag, note = asyncio.run(run_async())
        who = f"{label} ({route})"
        rows.append(
            (
                who,
                f"{WAVE:,} concurrent `await q.send`",
                async_send,
                f"sync `send_many` x {WAVE:,}",
                sync_send,
                send_lag,
                note,
            )
        )
        rows.append(
            (
                who,
                f"async consume, concurrency={CONCURRENCY}",
                async_sink,
                f"sync sink, {CONCURRENCY} threads",
                sync_sink,
                sink_lag,
                "",
            )
        )
        if label == "SQLite":
            group_stats = getattr(sq.producer, "transactions", None)
            before = group_stats if isinstance(group_stats, int) else 0
            rate = sync_threads(sq, items[: min(n, 8000)], 16)
            used = getattr(sq.producer, "transactions", 0) - before
            sent = min(n, 8000) // 16 * 16
            rows.append(
                (
                    f"{label} (sync)",
                    "sync `send` from 16 threads",
                    rate,
                    "",
                    None,
                    None,
                    f"{used:,} transactions for {sent:,} sends",
                )
            )
            sq.browser().purge()
    finally:
        sync_conn.delete(name)
        sync_conn.close()
    return rows


def redis_reference(url: str, n: int) -> Row:
    """XADD of kew's entries (id, body, headers) with redis.asyncio, in
    pipelines of ``WAVE``: what a hand-written async producer does."""
    import redis.asyncio as aioredis

    enc = msgspec.json.Encoder()
    headers = enc.encode(
        {"content-type": "application/json", "kew-type": "Sample", "kew-sent-at": int(time.time())}
    )
    entries = [
        {"id": os.urandom(8).hex(), "body": enc.encode(s), "headers": headers} for s in make(n)
    ]
    key = f"bench-aio-raw-{os.urandom(3).hex()}"

    async def main() -> tuple[float, tuple[float, float]]:
        r: Any = aioredis.Redis.from_url(url.split("?")[0])
        try:

            async def add() -> None:
                for i in range(0, n, WAVE):
                    pipe = r.pipeline(transaction=False)
                    for fields in entries[i : i + WAVE]:
                        pipe.xadd(key, fields)
                    await pipe.execute()

            took, lag = await timed(add)
            return n / took, lag
        finally:
            await r.delete(key)
            await r.aclose()

    rate, lag = asyncio.run(main())
    return (
        "Redis (reference)",
        f"redis.asyncio XADD, pipelines of {WAVE:,}",
        rate,
        "",
        None,
        lag,
        "",
    )


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/aio.sqlite3"


def table(rows: list[Row], n: int) -> str:
    lines = [
        f"kew.aio next to the sync API, {n:,} messages of ~200 bytes, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores",
        "",
        "| provider (route) | line | msg/s | reference line | reference msg/s | ratio "
        "| loop lag: max (p99) | note |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for who, line, rate, ref_line, ref, lag, note in rows:
        ratio = f"{rate / ref:.2f}" if ref else ""
        lines.append(
            f"| {who} | {line} | {rate:,.0f} | {ref_line} | "
            f"{'' if ref is None else f'{ref:,.0f}'} | {ratio} | "
            f"{'' if lag is None else f'{lag[0]:.1f} ms ({lag[1]:.1f})'} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--providers", default="memory,sqlite,redis,rabbitmq")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    args = ap.parse_args()
    chosen = args.providers.split(",")
    rows: list[Row] = []
    if "memory" in chosen:
        rows += bench("memory", f"memory://bench-aio-{os.getpid()}", args.n)
    if "sqlite" in chosen:
        with sqlite_url() as url:
            rows += bench("SQLite", url, args.n)
    if "redis" in chosen:
        if port_open("127.0.0.1", 6379):
            rows += bench("Redis", args.redis, args.n)
            rows.append(redis_reference(args.redis, args.n))
        else:
            print("Redis is not reachable on 127.0.0.1:6379: skipped", file=sys.stderr)
    if "rabbitmq" in chosen:
        if port_open("127.0.0.1", 5672):
            rows += bench("RabbitMQ", args.amqp, args.n)
        else:
            print("RabbitMQ is not reachable on 127.0.0.1:5672: skipped", file=sys.stderr)
    text = table(rows, args.n)
    print(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "aio.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
