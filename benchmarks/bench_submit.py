"""Submitting tasks: kew's ``submit`` (with its ``queued`` status event) next
to Dramatiq's ``send()``, on the machine's RabbitMQ and Redis, in one run.

    python benchmarks/bench_submit.py [-n 2000] [--broker rabbitmq --broker redis] [--rounds 3]
                                      [--own-rabbitmq]

Lines (tasks of ~200 bytes, no worker running; each call durable before it
returns: RabbitMQ publisher confirms, Redis replies):

  kew submit              ``tq.submit(v)`` in one thread: the task and its
                          ``queued`` event in one round trip
  kew submit as before    the task, then its event (two round trips): what
                          ``submit`` did before ``send_to``
  kew submit, no events   ``App(events=False)``: the task alone
  kew submit_many(100)    ``tq.submit_many(batch)``, batches of 100: tasks/s
  kew submit, 16 threads  ``tq.submit`` from 16 threads at once (group
                          commit: round trips shared); and the round trips
                          (``send_to`` calls) they took
  kew submit_async        1,000 concurrent ``await tq.submit_async(v)`` on
                          one event loop, with the loop lag (worst delay of a
                          1 ms timer, and its p99)
  Dramatiq send           ``actor.send(...)`` in one thread: RabbitmqBroker
                          with ``confirm_delivery=True``; RedisBroker
  Dramatiq send, 16 thr.  the same from 16 threads

This 2-core machine is shared and its load swings within seconds, so the
one-thread lines run *interleaved*: ``--rounds`` times over, each takes a
turn of n/10 calls (submit_many: 5 x n tasks per round), and a line's rate
is its calls over its summed time; the threaded and async lines run once a
round.  The ratio is to Dramatiq's one-thread ``send`` on the same broker
(the targets: ``submit`` >= 1 x, ``submit_many(100)`` >= 5 x).  The queues
made are deleted.  With ``--own-rabbitmq`` the RabbitMQ lines run on a node
the benchmark starts (tests/brokers/rabbitmq.py, free loopback ports) instead
of the machine's: a pytest session ending meanwhile deletes every queue made
on the machine's broker during it, this benchmark's included.  Writes
benchmarks/results/submit.md too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from kew.qchan.spi import now_ms
from kew.task import App, MemoryTaskStore, TaskEvent, TaskQueue
from kew.testing.util import port_open

URLS = {
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
}
PORTS = {"rabbitmq": 5672, "redis": 6379}
THREADS = 16
BATCH = 100
WAVE = 1000
TURNS = 10  # turns of each one-thread line per round


class Job(msgspec.Struct, frozen=True):
    n: int
    name: str
    payload: str


def jobs(n: int) -> list[Job]:
    return [Job(i, "bench", "x" * 160) for i in range(n)]


def threaded(n: int, one: Callable[[int], object]) -> float:
    """Seconds for ``one(i)``, i < n, spread over THREADS threads."""
    start = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        start.wait()
        try:
            for i in range(k, n, THREADS):
                one(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


class Lag:
    """The delays of a 1 ms timer on the running loop (as bench_aio.py)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            self.delays.append(max(0.0, loop.time() - t0 - 0.001))


async def submits_async(tq: TaskQueue[Job], items: list[Job], lag: Lag) -> float:
    """Seconds for every item submitted by its own coroutine, WAVE at once."""
    room = asyncio.Semaphore(WAVE)

    async def one(j: Job) -> None:
        async with room:
            await tq.submit_async(j)

    await tq.submit_async(items[0])  # the route made
    probe = asyncio.create_task(lag.probe())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(j) for j in items))
    took = time.perf_counter() - t0
    probe.cancel()
    return took


class Line:
    """Tasks done and seconds taken, summed over turns."""

    def __init__(self, name: str, note: str = "") -> None:
        self.name = name
        self.note = note
        self.tasks = 0
        self.seconds = 0.0

    def turn(self, tasks: int, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        self.seconds += time.perf_counter() - t0
        self.tasks += tasks

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0


# -- the systems -------------------------------------------------------------------


class Kew:
    """A task queue with events, one without, on one broker."""

    def __init__(self, url: str) -> None:
        suffix = os.urandom(3).hex()
        self.apps: list[App] = []
        self.queues: list[TaskQueue[Job]] = []
        for events in (True, False):
            app = App(url, store=MemoryTaskStore(), events=events, events_queue=f"bs.ev-{suffix}")
            self.apps.append(app)
            self.queues.append(app.task_queue(f"bs.tasks-{suffix}-{int(events)}", Job, noop))
        for tq in self.queues:
            tq.submit(jobs(1)[0])  # connected, declared
        self.commits = 0
        conn: Any = self.apps[0].connector
        real = conn.send_to

        def counted(sends: Any) -> None:
            self.commits += 1
            real(sends)

        conn.send_to = counted

    def close(self) -> None:
        for app in self.apps:
            for name in app.queue_names():
                app.connector.delete(name)
            app.close()


def noop(job: Job) -> None:
    pass


def submit_before(tq: TaskQueue[Job], j: Job) -> None:
    """What ``submit`` did before ``send_to`` (kew 2026-11): post the task,
    then send its ``queued`` event (a round trip each)."""
    tq.validate(j)
    task_id = tq.queue.post(j)
    tq.app.emitter.emit([TaskEvent(task_id, tq.name, "queued", now_ms())])


class Dramatiq:
    """A Dramatiq actor on one broker: RabbitMQ with confirms, or Redis."""

    def __init__(self, broker_name: str, url: str) -> None:
        import dramatiq

        self.queue = f"bs-dq-{os.urandom(3).hex()}"
        self.rabbit = broker_name == "rabbitmq"
        if self.rabbit:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            self.broker: Any = RabbitmqBroker(url=url, confirm_delivery=True)
        else:
            from dramatiq.brokers.redis import RedisBroker

            self.broker = RedisBroker(url=url)

        def task(n: int, name: str, payload: str) -> None:
            pass

        self.actor: Any = dramatiq.actor(task, queue_name=self.queue, broker=self.broker)
        self.send(jobs(1)[0])  # connected, declared

    def send(self, j: Job) -> None:
        self.actor.send(j.n, j.name, j.payload)

    def close(self) -> None:
        if self.rabbit:
            for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
                self.broker.channel.queue_delete(name)
        else:
            keys = self.broker.client.keys(f"dramatiq:{self.queue}*")
            if keys:
                self.broker.client.delete(*keys)
        self.broker.close()


def bench(broker_name: str, url: str, n: int, rounds: int) -> list[Line]:
    items = jobs(n)
    turn = max(1, n // TURNS)
    submit, bare = Line("kew submit (with its queued event)"), Line("kew submit, no events")
    before = Line("kew submit as before", "the task, then its event: two round trips")
    many = Line(f"kew submit_many({BATCH})", "tasks/s")
    threads = Line(f"kew submit, {THREADS} threads")
    aio = Line(f"kew submit_async, {WAVE} at once")
    send = Line("Dramatiq send", "confirm_delivery=True" if broker_name == "rabbitmq" else "")
    dq_threads = Line(f"Dramatiq send, {THREADS} threads")
    k, d = Kew(url), Dramatiq(broker_name, url)
    tq, tq_bare = k.queues
    lag = Lag()
    try:
        for r in range(rounds):
            for t in range(TURNS):
                part = items[t * turn : (t + 1) * turn]
                submit.turn(len(part), lambda p=part: [tq.submit(j) for j in p])
                send.turn(len(part), lambda p=part: [d.send(j) for j in p])
                bare.turn(len(part), lambda p=part: [tq_bare.submit(j) for j in p])
                before.turn(len(part), lambda p=part: [submit_before(tq, j) for j in p])
                batches = max(1, 5 * turn // BATCH)
                many.turn(
                    batches * BATCH,
                    lambda b=batches: [tq.submit_many(items[:BATCH]) for _ in range(b)],
                )
            commits0 = k.commits
            threads.seconds += threaded(n, lambda i: tq.submit(items[i]))
            threads.tasks += n
            threads.note = f"{n} submits in {k.commits - commits0} round trips"
            dq_threads.seconds += threaded(n, lambda i: d.send(items[i]))
            dq_threads.tasks += n
            aio.seconds += asyncio.run(submits_async(tq, items, lag))
            aio.tasks += n
            print(f"{broker_name} round {r + 1} of {rounds} done", flush=True)
    finally:
        k.close()
        d.close()
    worst = sorted(lag.delays)
    if worst:
        p99 = worst[int(len(worst) * 0.99)]
        aio.note = f"loop lag max {worst[-1] * 1000:.1f} ms (p99 {p99 * 1000:.1f})"
    return [submit, before, bare, many, threads, aio, send, dq_threads]


@contextlib.contextmanager
def own_rabbitmq() -> Iterator[None]:
    """A RabbitMQ node of the tests' kind for the RabbitMQ lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.brokers.rabbitmq import RabbitMQServer

    with tempfile.TemporaryDirectory(prefix="kew-bench-") as tmp:
        node = RabbitMQServer(Path(tmp))
        node.start()
        try:
            URLS["rabbitmq"] = f"amqp://guest:guest@127.0.0.1:{node.port}/"
            PORTS["rabbitmq"] = node.port
            print(f"own RabbitMQ node at {URLS['rabbitmq']}", flush=True)
            yield
        finally:
            node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="submits per line and round")
    ap.add_argument("--broker", action="append", choices=sorted(URLS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--own-rabbitmq", action="store_true", help="a RabbitMQ node of its own")
    args = ap.parse_args()
    with own_rabbitmq() if args.own_rabbitmq else contextlib.nullcontext():
        run(args)


def run(args: argparse.Namespace) -> None:
    out = ["| broker | line | tasks/s | vs Dramatiq send | note |", "|---|---|---:|---:|---|"]
    for b in args.broker or ["rabbitmq", "redis"]:
        if not port_open("127.0.0.1", PORTS[b]):
            print(f"{b}: not running on 127.0.0.1:{PORTS[b]}, skipped")
            continue
        lines = bench(b, URLS[b], args.n, args.rounds)
        base = next(line.rate for line in lines if line.name == "Dramatiq send")
        for line in lines:
            out.append(
                f"| {b} | {line.name} | {line.rate:,.0f} | {line.rate / base:.2f}x | {line.note} |"
            )
    table = "\n".join(out)
    print(table)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "submit.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
