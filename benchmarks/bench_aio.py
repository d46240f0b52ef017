"""kew.aio on each provider, next to the same provider's sync API in one run.

    python benchmarks/bench_aio.py [-n 20000] [--providers memory,sqlite,redis,rabbitmq]
                                   [--gc-freeze] [--repeat 3]

Per provider (its route, native or the thread bridge, is printed), n
messages of ~200 bytes (the harness's Sample):

  async send      1,000 concurrent ``await q.send(v)`` (a semaphore of
                  1,000: a new send starts as one returns), against the
                  sync ``send_many`` in batches of 1,000: the ratio
  async consume   ``async with q.sink(handler)`` (the defaults: one
                  coroutine, the adaptive window) draining those
                  messages, against the sync ``q.sink(handler)``; then
                  both with concurrency=8
  loop lag        during each async line, a task sleeping 1 ms in a loop:
                  the worst delay of its timer, in ms (the bound: < 20 ms),
                  and the 99th percentile of the delays

memory:// is the floor: no I/O and no thread, so its loop lag is what the
1,000 coroutines make by themselves (each encodes and checks its value on
the loop; a turn of the loop runs every one that is ready).
On SQLite also the transactions the async sends took (group commit), and
sync ``send`` from 16 threads (each returns once its own message is
committed) with its transactions.  On Redis also the reference: a
redis.asyncio loop doing XADD of the same entries (encoded beforehand) in
pipelines of 1,000, in the same event loop just before each run of the
concurrent sends; the async sends against it; the round trips they took
(group commit); and kew.aio's own ``send_many`` in batches of 1,000.
On RabbitMQ (persistent messages, confirmed) the same with aio-pika as the
reference: 1,000 concurrent publishes of kew's envelopes (made beforehand)
on a channel with publisher confirms, each awaiting its confirm; also raw
pika publishing one confirm at a time (5,000 messages); and the writes the
async sends took, with the most messages unconfirmed at once.
``--repeat N`` runs the concurrent sends (and the reference) N times,
alternately: the best rate of each, the worst loop lag.  ``--gc-freeze``
freezes the benchmark's own values out of the garbage collector (its
full collections otherwise stall the loop for 15-80 ms, whatever the
provider).
Writes a markdown table to stdout and to benchmarks/results/aio.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
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
#: --gc-freeze: gc.freeze() once the values are made, so that the loop lag
#: measured is not that of collecting the benchmark's own 20,000 values.
FREEZE = False


def made(n: int) -> list[Sample]:
    items = make(n)
    if FREEZE:
        gc.collect()
        gc.freeze()
    return items


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
    await concurrent_calls(q.send, items)


async def concurrent_calls(
    call: Callable[[Any], Coroutine[Any, Any, Any]], items: list[Any]
) -> None:
    """``await call(item)`` for every item, each in a task of its own,
    ``WAVE`` at a time (a semaphore: a new call starts as one returns)."""
    room = asyncio.Semaphore(WAVE)
    tasks: set[asyncio.Task[Any]] = set()
    failed: list[BaseException] = []

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        room.release()
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]

    for item in items:
        await room.acquire()
        task = asyncio.create_task(call(item))
        tasks.add(task)
        task.add_done_callback(done)
    while tasks:
        await asyncio.wait(set(tasks))
    if failed:
        raise failed[0]


async def async_consume(
    q: kew.aio.Queue[Sample], n: int, prefetch: int | None = None, defaults: bool = False
) -> None:
    """Drain ``n`` with ``q.sink(take, concurrency=CONCURRENCY)``, or with
    ``q.sink(take)`` (``defaults``: one coroutine, the adaptive window)."""
    count = [0]
    all_in = asyncio.Event()

    async def take(_: Sample) -> None:
        count[0] += 1
        if count[0] == n:
            all_in.set()

    sink = q.sink(take) if defaults else q.sink(take, concurrency=CONCURRENCY, prefetch=prefetch)
    async with sink:
        async with asyncio.timeout(600):
            await all_in.wait()


def sync_consume(
    q: kew.Queue[Sample], n: int, prefetch: int | None = None, defaults: bool = False
) -> float:
    """msg/s of the sync sink (its window adapts unless ``prefetch`` pins it;
    ``defaults``: ``q.sink(take)``, one thread)."""
    count = [0]
    lock = threading.Lock()
    all_in = threading.Event()

    def take(_: Sample) -> None:
        with lock:
            count[0] += 1
            if count[0] == n:
                all_in.set()

    t0 = time.perf_counter()
    sink = q.sink(take) if defaults else q.sink(take, concurrency=CONCURRENCY, prefetch=prefetch)
    with sink:
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


async def async_send_many(q: kew.aio.Queue[Sample], items: list[Sample]) -> None:
    for i in range(0, len(items), WAVE):
        await q.send_many(items[i : i + WAVE])


def worst(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return max(a[0], b[0]), max(a[1], b[1])


def bench(
    label: str, url: str, n: int, raw_url: str | None = None, repeat: int = 1, amqp: bool = False
) -> list[Row]:
    """The lines of one provider: (provider, line, msg/s, reference line,
    reference msg/s, max loop lag ms, note).  The concurrent sends run
    ``repeat`` times (the best rate, the worst lag); with ``raw_url`` (Redis)
    a hand-written redis.asyncio loop runs before each, in the same loop (the
    best rate, the worst lag), and kew.aio's own ``send_many`` after; with
    ``amqp`` (RabbitMQ) aio-pika instead, and raw pika one confirm at a time."""
    items = made(n)
    entries = raw_entries(n) if raw_url is not None else []
    envelopes = amqp_envelopes(n) if amqp else []
    name = f"bench-aio-{os.urandom(3).hex()}"
    sync_conn = kew.connect(url)
    sq = kew.Queue(sync_conn, name, Sample)
    rows: list[Row] = []
    one: tuple[float, int] | None = None
    try:
        sq.declare()
        # the sync reference first: send_many in batches, then the sync sink
        t0 = time.perf_counter()
        for i in range(0, n, WAVE):
            sq.send_many(items[i : i + WAVE])
        sync_send = n / (time.perf_counter() - t0)
        sync_sink = sync_consume(sq, n)
        for i in range(0, n, WAVE):  # again, for the sink at its defaults
            sq.send_many(items[i : i + WAVE])
        sync_default = sync_consume(sq, n, defaults=True)
        pinned: dict[int, float] = {}  # RabbitMQ: the sync sink with its window pinned
        for window in PINNED if amqp else ():
            for i in range(0, n, WAVE):
                sq.send_many(items[i : i + WAVE])
            pinned[window] = sync_consume(sq, n, prefetch=window)
        if amqp:  # raw pika, each publish waiting for its confirm
            sync_conn.declare(f"{name}-raw")
            k = min(n, ONE_BY_ONE)
            one = (pika_one_by_one(url, f"{name}-raw", envelopes[:k]), k)
            kew.Queue(sync_conn, f"{name}-raw", Sample).browser().purge()

        async def run_async() -> tuple[
            str,
            float,
            tuple[float, float],
            float,
            tuple[float, float],
            str,
            tuple[float, tuple[float, float]] | None,
            tuple[float, tuple[float, float]] | None,
        ]:
            conn = kew.aio.connect(url)
            route = kew.aio.route(conn)
            q = kew.aio.Queue(conn, name, Sample)
            await q.declare()
            group = getattr(conn, "group", None)  # SQLite's writer
            before = group.transactions if group is not None else 0
            sends = getattr(conn, "sends", None)  # Redis's group commit
            pub = getattr(conn, "publisher", None)  # RabbitMQ's publishing thread
            raw: tuple[float, tuple[float, float]] | None = None
            best, send_lag, note = 0.0, (0.0, 0.0), ""
            for run in range(repeat):
                if raw_url is not None or amqp:
                    if amqp:
                        rate, lag = await aio_pika_raw(url, f"{name}-raw", envelopes)
                    else:
                        rate, lag = await redis_raw(raw_url or "", entries)
                    raw = (max(raw[0], rate), worst(raw[1], lag)) if raw else (rate, lag)
                flushes = sends.flushes if sends is not None else 0
                writes = pub.flushes if pub is not None else 0
                took, lag = await timed(lambda: concurrent_sends(q, items))
                best, send_lag = max(best, n / took), worst(send_lag, lag)
                if sends is not None:
                    note = f"{sends.flushes - flushes:,} round trips for {n:,} sends"
                if pub is not None:
                    note = (
                        f"{pub.flushes - writes:,} writes for {n:,} sends, "
                        f"up to {pub.most_in_flight:,} unconfirmed at once"
                    )
                if run < repeat - 1:
                    await q.browser().purge()
            if group is not None:
                note = f"{group.transactions - before:,} transactions for {n * repeat:,} sends"
            consumed, consume_lag = await timed(lambda: async_consume(q, n))
            await async_send_many(q, items)  # again, for the sink at its defaults
            took, lag = await timed(lambda: async_consume(q, n, defaults=True))
            default.append((n / took, lag))
            many: tuple[float, tuple[float, float]] | None = None
            if raw_url is not None or amqp:  # kew.aio's own send_many, in batches of WAVE
                took, lag = await timed(lambda: async_send_many(q, items))
                many = (n / took, lag)
                if amqp:  # consumed with a larger window, as the sync sink above
                    took, lag = await timed(lambda: async_consume(q, n, prefetch=PINNED[-1]))
                    wide.append((n / took, lag))
                else:
                    await q.browser().purge()
            await q.close()
            await conn.close()
            return route, best, send_lag, n / consumed, consume_lag, note, many, raw

        wide: list[tuple[float, tuple[float, float]]] = []
        default: list[tuple[float, tuple[float, float]]] = []  # q.sink(take)
        route, async_send, send_lag, async_sink, sink_lag, note, many, raw = asyncio.run(
            run_async()
        )
        who = f"{label} ({route})"
        raw_line = f"redis.asyncio XADD, pipelines of {WAVE:,}"
        if amqp:
            raw_line = f"aio-pika, {WAVE:,} concurrent publishes (confirms)"
        if raw is not None:  # the same sends against a hand-written async client
            rows.append(
                (who, f"{WAVE:,} concurrent `await q.send`", async_send, raw_line, raw[0], None, "")
            )
        one_line = "raw pika, one confirm at a time"
        if one is not None:
            rows.append(
                (who, f"{WAVE:,} concurrent `await q.send`", async_send, one_line, one[0], None, "")
            )
        if many is not None:
            rows.append(
                (
                    who,
                    f"async `send_many` x {WAVE:,}",
                    many[0],
                    f"sync `send_many` x {WAVE:,}",
                    sync_send,
                    many[1],
                    "",
                )
            )
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
                "async consume, `q.sink(h)` (defaults)",
                default[0][0],
                "sync sink, `q.sink(h)` (defaults)",
                sync_default,
                default[0][1],
                "",
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
        if amqp:  # both sinks with the same window
            measured = [(PINNED[0], async_sink, sink_lag), *((PINNED[1], r, g) for r, g in wide)]
            for window, rate, lag in measured:
                line = f"async consume, concurrency={CONCURRENCY}"
                line += "" if window == CONCURRENCY else f", prefetch={window}"
                ref = f"sync sink, {CONCURRENCY} threads, prefetch={window}"
                rows.append((who, line, rate, ref, pinned[window], lag, "the same window"))
        if raw is not None:
            rows.append((f"{label} (reference)", raw_line, raw[0], "", None, raw[1], ""))
        if one is not None:
            note = f"{one[1]:,} messages"
            rows.append((f"{label} (reference)", one_line, one[0], "", None, None, note))
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
        if amqp:
            sync_conn.delete(f"{name}-raw")
        sync_conn.close()
    return rows


Entry = dict[str, bytes | str]


def raw_entries(n: int) -> list[Entry]:
    """kew's entries (id, body, headers) of ``n`` values, made beforehand."""
    enc = msgspec.json.Encoder()
    headers = enc.encode(
        {"content-type": "application/json", "kew-type": "Sample", "kew-sent-at": int(time.time())}
    )
    return [{"id": os.urandom(8).hex(), "body": enc.encode(s), "headers": headers} for s in made(n)]


async def redis_raw(
    url: str, entries: list[dict[str, bytes | str]]
) -> tuple[float, tuple[float, float]]:
    """XADD of ``entries`` with redis.asyncio, in pipelines of ``WAVE``:
    what a hand-written async producer does (msg/s, loop lag)."""
    import redis.asyncio as aioredis

    key = f"bench-aio-raw-{os.urandom(3).hex()}"
    r: Any = aioredis.Redis.from_url(url.split("?")[0])
    try:

        async def add() -> None:
            for i in range(0, len(entries), WAVE):
                pipe = r.pipeline(transaction=False)
                for fields in entries[i : i + WAVE]:
                    pipe.xadd(key, fields)
                await pipe.execute()

        took, lag = await timed(add)
        return len(entries) / took, lag
    finally:
        await r.delete(key)
        await r.aclose()


#: RabbitMQ: windows both sinks are also run with (otherwise both adapt,
#: up to 256).
PINNED = (CONCURRENCY, 64)
#: Messages raw pika publishes one confirm at a time (at ~1,000/s: 5 s).
ONE_BY_ONE = 5000

Envelope = tuple[str, bytes, dict[str, Any]]


def amqp_envelopes(n: int) -> list[Envelope]:
    """kew's AMQP envelopes (message id, body, headers) of ``n`` values,
    made beforehand."""
    headers: dict[str, Any] = {
        "content-type": "application/json",
        "kew-type": "Sample",
        "kew-sent-at": int(time.time() * 1000),
    }
    enc = msgspec.json.Encoder()
    return [(os.urandom(8).hex(), enc.encode(s), headers) for s in made(n)]


def pika_one_by_one(url: str, queue: str, envelopes: list[Envelope]) -> float:
    """msg/s of a raw pika BlockingChannel in confirm mode publishing kew's
    envelopes (persistent, ``mandatory``), each waiting for its confirm."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        props = [
            pika.BasicProperties(
                message_id=mid, headers=h, delivery_mode=2, content_type=h["content-type"]
            )
            for mid, _, h in envelopes
        ]
        t0 = time.perf_counter()
        for (_, body, _), p in zip(envelopes, props, strict=True):
            ch.basic_publish("", queue, body, p, mandatory=True)
        return len(envelopes) / (time.perf_counter() - t0)
    finally:
        conn.close()


async def aio_pika_raw(
    url: str, queue: str, envelopes: list[Envelope]
) -> tuple[float, tuple[float, float]]:
    """aio-pika publishing kew's envelopes (made into its messages
    beforehand: persistent, ``mandatory``) on a channel with publisher
    confirms, ``WAVE`` concurrent publishes each awaiting its confirm, as
    the concurrent sends do (msg/s, loop lag); then the queue is purged."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        messages = [
            aio_pika.Message(
                body,
                message_id=mid,
                headers=h,
                content_type=h["content-type"],
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            for mid, body, h in envelopes
        ]
        exchange = ch.default_exchange

        async def publish(m: aio_pika.Message) -> None:
            await exchange.publish(m, routing_key=queue, mandatory=True)

        took, lag = await timed(lambda: concurrent_calls(publish, messages))
        await (await ch.get_queue(queue, ensure=False)).purge()
        return len(envelopes) / took, lag
    finally:
        await conn.close()


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
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the values are made")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of the concurrent sends (best rate, worst lag)"
    )
    args = ap.parse_args()
    global FREEZE
    FREEZE = args.gc_freeze
    chosen = args.providers.split(",")
    rows: list[Row] = []
    if "memory" in chosen:
        rows += bench("memory", f"memory://bench-aio-{os.getpid()}", args.n, repeat=args.repeat)
    if "sqlite" in chosen:
        with sqlite_url() as url:
            rows += bench("SQLite", url, args.n, repeat=args.repeat)
    if "redis" in chosen:
        if port_open("127.0.0.1", 6379):
            rows += bench("Redis", args.redis, args.n, raw_url=args.redis, repeat=args.repeat)
        else:
            print("Redis is not reachable on 127.0.0.1:6379: skipped", file=sys.stderr)
    if "rabbitmq" in chosen:
        if port_open("127.0.0.1", 5672):
            rows += bench("RabbitMQ", args.amqp, args.n, repeat=args.repeat, amqp=True)
        else:
            print("RabbitMQ is not reachable on 127.0.0.1:5672: skipped", file=sys.stderr)
    text = table(rows, args.n)
    print(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "aio.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
