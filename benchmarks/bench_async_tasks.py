"""End-to-end no-op async tasks/s through one worker process: kew next to Taskiq and FastStream.

    python benchmarks/bench_async_tasks.py              # 10,000 tasks, both brokers, 3 rounds
    python benchmarks/bench_async_tasks.py -n 20000 --rounds 1 --broker redis \\
        --system kew --system taskiq --system faststream

Issue 17's measure: no-op ``async def`` tasks, a full queue drained by one
worker process, on the machine's RabbitMQ (127.0.0.1:5672) and Redis
(127.0.0.1:6379), every system in the same run, interleaved (the order of
the systems rotates from round to round), medians over ``--rounds``.

The systems (the handler is ``async def noop(x: int) -> None`` that counts):

- ``kew``: ``@app.task async def noop``, ``kew worker bench_async_tasks:app``
  at its defaults (``--concurrency 4``, the adaptive window, status events
  on: a ``queued`` event at submit, the end event stored in one group commit
  with the ack); ``kew-c32``: ``--concurrency 32``; ``kew-bare`` and
  ``kew-bare-c32``: the same with ``App(events=False)``.  Pre-filled with
  ``submit_many`` (1,000 a call).  Acked after the handler returned.
- ``taskiq``: Taskiq's ``AioPikaBroker`` (RabbitMQ; its default queue type is
  *quorum*, qos 10) or ``RedisStreamBroker`` (Redis; the broker its README
  presents, the one that acks), at their defaults, ``taskiq worker
  bench_async_tasks:broker --workers 1`` (a manager process and one worker
  process; ``--max-async-tasks 100``; acked ``when_saved``: after the task
  and its (dummy) result).  Pre-filled with ``.kiq()``.  At its default log
  level (INFO) it logs a line per task; ``taskiq-quiet`` runs
  ``--log-level WARNING``; ``taskiq-classic`` (RabbitMQ) is taskiq-quiet on a
  classic queue, kew's queue type.
- ``faststream``: a FastStream subscriber, ``faststream run
  bench_async_tasks:app`` (one process): on RabbitMQ a ``RabbitQueue``
  (classic, durable; FastStream sets no qos: unlimited prefetch), on Redis a
  ``StreamSub`` with a consumer group (the only Redis subscriber that acks;
  a list subscriber pops and never acks).  Its default ack policy
  (``REJECT_ON_ERROR``) acks after the handler returned.  Pre-filled by
  publishing (RabbitMQ: ``persist=True``, as kew and Taskiq send).  At its
  default log level it logs two lines per message; ``faststream-quiet`` has
  the broker made with ``logger=None`` (its ``--log-level`` cannot do it: it
  sets the level the messages are logged at too).

What is measured, the same way for every system:

- tasks/s = N / (end - first), where *first* is the first handler call
  (worker start-up excluded; "start-up" says how long it took) and *end* the
  later of the N-th handler's return and the broker's own report that the
  queue is drained, polled every 10 ms: on Redis, every consumer group of the
  stream has nothing pending (XINFO GROUPS) and nothing after its last
  delivered id (every task delivered and acked); on RabbitMQ, no message
  ready (a passive ``queue.declare``: unacked ones are not counted there);
- after the worker is stopped (SIGTERM) the broker must hold nothing for the
  queue (RabbitMQ: a delivery not acked goes back to the queue when the
  worker's connection closes; Redis: nothing pending, nothing undelivered),
  and the handler must have run N times: "ok" in the table;
- worker CPU us/task: the worker process's CPU time (every thread;
  ``time.process_time`` in the handler) from the first to the N-th task;
- the machine's load: its 1-minute load average at the start of each run and
  how busy its CPUs were (all processes) during the drain.

Results go to stdout and benchmarks/results/async-tasks-<date>.md.  This
module is also the worker-side app of the three systems: with
``BENCH_SYSTEM`` set it declares that system's task at import.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from procs import child_env, machine, run_step, show_failure, stop_worker, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

URLS = {
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}
#: In the order of the tables: the three at their defaults first.
SYSTEMS = (
    "kew",
    "taskiq",
    "faststream",
    "kew-c32",
    "kew-bare",
    "kew-bare-c32",
    "taskiq-quiet",
    "taskiq-classic",
    "faststream-quiet",
)
KEW = ("kew", "kew-c32", "kew-bare", "kew-bare-c32")
PEERS = ("taskiq", "taskiq-quiet", "taskiq-classic", "faststream", "faststream-quiet")
RABBIT_ONLY = ("taskiq-classic",)
#: FastStream's consumer group on Redis (Taskiq's is its default, "taskiq").
FS_GROUP = "bench"
FILL_BATCH = 1000

# -- worker side: the no-op task of each system ----------------------------------------

_lock = threading.Lock()
_seen = 0
_first = 0.0
_cpu_first = 0.0
_N = int(os.environ.get("BENCH_N", "0"))


def _count() -> None:
    """What every handler does: count, and note the first and the N-th call
    (wall time, and this process's CPU time over every thread)."""
    global _seen, _first, _cpu_first
    with _lock:  # (each system runs its handlers on one loop; the lock costs ~0.1 us)
        _seen += 1
        seen = _seen
        if seen == 1:
            _first = time.time()
            _cpu_first = time.process_time()
    if seen == _N:
        cpu = time.process_time() - _cpu_first
        out = Path(os.environ["BENCH_OUT"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"first": _first, "last": time.time(), "n": seen, "cpu": cpu, "pid": os.getpid()}
            )
        )
        tmp.rename(out)


def _build_kew(system: str, url: str, queue: str) -> dict[str, Any]:
    from kew.task import App

    app = App(url, name=queue, events_queue=f"{queue}.events", events="bare" not in system)

    @app.task(queue)
    async def noop(x: int) -> None:
        _count()

    return {"app": app, "noop": noop}


def _build_taskiq(system: str, broker: str, url: str, queue: str) -> dict[str, Any]:
    b: Any
    if broker == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue, QueueType

        tasks, dead = Queue(name=queue), Queue(name=f"{queue}.dlq")
        if system == "taskiq-classic":
            tasks = dataclasses.replace(tasks, type=QueueType.CLASSIC)
            dead = dataclasses.replace(dead, type=QueueType.CLASSIC)
        b = AioPikaBroker(
            url, exchange=Exchange(name=queue), task_queues=[tasks], dead_letter_queue=dead
        )
    else:
        from taskiq_redis import RedisStreamBroker

        b = RedisStreamBroker(url, queue_name=queue)

    async def noop(x: int) -> None:
        _count()

    return {"broker": b, "noop": b.task(task_name="noop")(noop)}


def _build_faststream(system: str, broker: str, url: str, queue: str) -> dict[str, Any]:
    from faststream import FastStream

    # FastStream logs each message at the broker's log level, which its CLI's
    # --log-level sets too: only logger=None takes the two lines away.
    quiet: dict[str, Any] = {"logger": None} if system == "faststream-quiet" else {}
    b: Any
    if broker == "rabbitmq":
        from faststream.rabbit import RabbitBroker, RabbitQueue

        b = RabbitBroker(url, **quiet)
        sub = b.subscriber(RabbitQueue(queue))
    else:
        from faststream.redis import RedisBroker, StreamSub

        b = RedisBroker(url, **quiet)
        sub = b.subscriber(stream=StreamSub(queue, group=FS_GROUP, consumer="c1"))

    async def noop(x: int) -> None:
        _count()

    sub(noop)
    return {"app": FastStream(b), "broker": b}


def _build(system: str, broker: str, queue: str) -> dict[str, Any]:
    url = URLS[broker]
    if system.startswith("kew"):
        return _build_kew(system, url, queue)
    if system.startswith("taskiq"):
        return _build_taskiq(system, broker, url, queue)
    return _build_faststream(system, broker, url, queue)


if os.environ.get("BENCH_SYSTEM"):
    globals().update(
        _build(os.environ["BENCH_SYSTEM"], os.environ["BENCH_BROKER"], os.environ["BENCH_QUEUE"])
    )


# -- producer side: pre-fill the queue ----------------------------------------------------


async def _fill_async(system: str, broker: str, queue: str, n: int) -> None:
    b: Any = globals()["broker"]
    if system.startswith("taskiq"):
        await b.startup()  # declares the queue (RabbitMQ) or the consumer group (Redis)
        noop = globals()["noop"]
        for start in range(0, n, 500):
            await asyncio.gather(*(noop.kiq(i) for i in range(start, min(n, start + 500))))
        await b.shutdown()
        return
    async with b:
        if broker == "rabbitmq":
            from faststream.rabbit import RabbitQueue

            await b.declare_queue(RabbitQueue(queue))
            send = [b.publish(i, queue=queue, persist=True) for i in range(n)]
        else:
            import redis.asyncio

            # the group before the tasks: FastStream would make it at "$" on start
            r = redis.asyncio.Redis.from_url(URLS["redis"])
            await r.xgroup_create(queue, FS_GROUP, id="$", mkstream=True)
            await r.aclose()
            send = [b.publish(i, stream=queue) for i in range(n)]
        for start in range(0, n, 50):  # (FastStream's Redis pool refuses more at once)
            await asyncio.gather(*send[start : start + 50])


def fill(n: int) -> None:
    """Queue n no-op tasks with BENCH_SYSTEM's own client."""
    system, broker, queue = (os.environ[k] for k in ("BENCH_SYSTEM", "BENCH_BROKER", "BENCH_QUEUE"))
    if system.startswith("kew"):
        noop = globals()["noop"]
        for start in range(0, n, FILL_BATCH):
            noop.submit_many([0] * (min(n, start + FILL_BATCH) - start))
        globals()["app"].close()
        return
    asyncio.run(_fill_async(system, broker, queue, n))


# -- the broker's own view of the queue ----------------------------------------------------


def stream_key(system: str, queue: str) -> str:
    """The Redis stream a system's tasks are in."""
    return f"kew:{{{queue}}}" if system.startswith("kew") else queue


class BrokerView:
    """Reads a queue's depth from the broker (not from the worker)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self._r: Any = None
        self._amqp: Any = None
        self._ch: Any = None
        if broker == "redis":
            import redis

            self._r = redis.Redis.from_url(URLS["redis"])
        else:
            self._connect()

    def _connect(self) -> None:
        import pika

        with contextlib.suppress(Exception):
            if self._amqp is not None:
                self._amqp.close()
        self._amqp = pika.BlockingConnection(pika.URLParameters(URLS["rabbitmq"]))
        self._ch = self._amqp.channel()

    def _amqp_call(self, call: Callable[[Any], Any]) -> Any:
        """``call(channel)``; once more on a new connection if the broker
        closed this one (it sits idle while a queue fills) or the channel."""
        import pika

        try:
            if self._ch.is_closed:
                self._ch = self._amqp.channel()
            return call(self._ch)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError):
            self._connect()
            return call(self._ch)

    def depth(self, system: str, queue: str) -> int:
        """Messages in the queue (RabbitMQ: ready; Redis: stream entries)."""
        if self._r is not None:
            return int(self._r.xlen(stream_key(system, queue)))
        declared = self._amqp_call(lambda ch: ch.queue_declare(queue, passive=True))
        return int(declared.method.message_count)

    def drained(self, system: str, queue: str) -> bool:
        """Redis: every group has nothing pending and nothing left to read;
        RabbitMQ: nothing ready (the unacked are checked after the stop)."""
        if self._r is None:
            return self.depth(system, queue) == 0
        key = stream_key(system, queue)
        groups = self._r.xinfo_groups(key)
        if not groups:
            return False
        for g in groups:
            if g["pending"]:
                return False
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            if self._r.xrange(key, f"({last}", "+", count=1):
                return False
        return True

    def clean(self, queue: str) -> None:
        """Everything of one run (names start with the run's queue name)."""
        if self._r is not None:
            keys = list(self._r.scan_iter(f"*{queue}*"))
            if keys:
                self._r.delete(*keys)
            return
        import pika

        names = [queue, f"{queue}.dead", f"{queue}.events", f"{queue}.events.dead", f"{queue}.dlq"]
        for name in names:

            def delete(ch: Any, name: str = name) -> None:
                ch.queue_delete(name)

            with contextlib.suppress(pika.exceptions.ChannelClosed):
                self._amqp_call(delete)
        with contextlib.suppress(pika.exceptions.ChannelClosed):
            # (Taskiq's exchange, named after the queue)
            self._amqp_call(lambda ch: ch.exchange_delete(queue))

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                self._amqp.close()


# -- the driver --------------------------------------------------------------------------


def worker_cmd(system: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    app = "bench_async_tasks:app"
    if system.startswith("kew"):
        conc = ["--concurrency", "32"] if system.endswith("-c32") else []
        return [sys.executable, "-m", "kew.cli", "worker", app, *conc]
    if system.startswith("taskiq"):
        quiet = ["--log-level", "WARNING"] if system != "taskiq" else []
        return [str(bin_dir / "taskiq"), "worker", "bench_async_tasks:broker", "-w", "1", *quiet]
    return [str(bin_dir / "faststream"), "run", app]


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]  # user .. steal
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


@dataclass
class Run:
    tasks: float  # tasks/s
    cpu_us: float  # worker CPU per task
    startup: float  # s from spawning the worker to its first task
    ack_lag_ms: float  # the broker's drained report after the N-th handler (Redis: all acked)
    load: float  # 1-minute load average at the start
    busy: float  # the machine's CPUs busy during the drain, 0..1
    ok: bool
    note: str = ""


@dataclass
class Line:
    runs: list[Run] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))


def run_one(
    name: str, broker: str, n: int, tmp: Path, view: BrokerView, alt: Path | None = None
) -> Run:
    """One line once; ``name`` ending in ``@alt``: kew from ``alt``."""
    system = name.split("@")[0]
    queue = f"bench-async-{name.replace('@', '-')}-{uuid.uuid4().hex[:8]}"
    out = tmp / f"{queue}.json"
    roots = [alt] if alt is not None and name.endswith("@alt") else []
    env = child_env(
        HERE,
        *roots,
        ROOT,
        BENCH_SYSTEM=system,
        BENCH_BROKER=broker,
        BENCH_QUEUE=queue,
        BENCH_N=str(n),
        BENCH_OUT=str(out),
    )
    log_path = tmp / f"{queue}.log"
    try:
        cmd = [sys.executable, str(HERE / "bench_async_tasks.py"), "--fill", str(n)]
        run_step(cmd, env, HERE, 900, f"{system}: filling")
        depth = view.depth(system, queue)
        if depth != n:
            raise RuntimeError(f"{system}: {depth} tasks in the queue after filling, not {n}")
        load = os.getloadavg()[0]
        with log_path.open("w") as log:
            spawned = time.time()
            proc = subprocess.Popen(
                worker_cmd(system),
                env=env,
                cwd=HERE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            busy0, total0 = _cpu_busy()
            drained_at: float | None = None
            deadline = time.monotonic() + max(180.0, n / 20)
            while drained_at is None or not out.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"{system} worker exited {proc.returncode}: {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system} worker did not finish {n} tasks in time")
                if drained_at is None and view.drained(system, queue):
                    drained_at = time.time()
                time.sleep(0.01)
            busy1, total1 = _cpu_busy()
        finally:
            stop_worker(proc, 40)
        res = json.loads(out.read_text())
        end = max(res["last"], drained_at)
        left = view.depth(system, queue) if broker == "rabbitmq" else 0
        ok = res["n"] == n and left == 0 and view.drained(system, queue)
        return Run(
            tasks=n / (end - res["first"]),
            cpu_us=res["cpu"] / max(n - 1, 1) * 1e6,
            startup=res["first"] - spawned,
            ack_lag_ms=(drained_at - res["last"]) * 1e3,
            load=load,
            busy=(busy1 - busy0) / max(total1 - total0, 1e-9),
            ok=ok,
            note="" if ok else f"{left} left in the queue after the stop",
        )
    finally:
        try:
            view.clean(queue)
        except Exception as e:
            print(f"clean-up of {queue} failed: {e}", file=sys.stderr)


def _kew_version() -> str:
    """The checkout's commit, "+" if its files differ from it."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return f"kew {head}{'+' if git('status', '--porcelain', '--untracked-files=no') else ''}"


def _versions() -> str:
    names = ("taskiq", "taskiq-aio-pika", "taskiq-redis", "faststream", "aio-pika", "redis", "pika")
    found = []
    for name in names:
        with contextlib.suppress(Exception):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(
    results: dict[tuple[str, str], Line], brokers: list[str], n: int, rounds: int, alt: str = ""
) -> str:
    lines = [
        f"# No-op async tasks through one worker process ({n:,} tasks, median of {rounds})",
        "",
        f"{machine()}, {_kew_version()}, {_versions()}. "
        "tasks/s: N / (first task to the later of the N-th handler's return and the broker "
        "reporting the queue drained: Redis every task acked, RabbitMQ none ready); "
        "ok: after the worker's stop the broker holds nothing for the queue and the handler "
        "ran N times. Defaults first; systems as in the module's docstring."
        + (f" @alt: the same kew line run from {alt}." if alt else ""),
        "",
        "| broker | system | tasks/s | min-max | worker CPU us/task | start-up s "
        "| acked after last, ms | load avg | machine busy | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for broker in brokers:
        for system in [s for base in SYSTEMS for s in (base, f"{base}@alt")]:
            line = results.get((broker, system))
            if line is None:
                continue
            if not line.runs:
                lines.append(f"| {broker} | {system} | failed | | | | | | | |")
                continue
            rates = [r.tasks for r in line.runs]
            ok = "yes" if all(r.ok for r in line.runs) and not line.failed else "NO"
            # (RabbitMQ reports ready messages only: no ack time to tell)
            lag = f"{line.median('ack_lag_ms'):.0f}" if broker == "redis" else "-"
            lines.append(
                f"| {broker} | {system} | {line.median('tasks'):,.0f} "
                f"| {min(rates):,.0f}-{max(rates):,.0f} | {line.median('cpu_us'):,.0f} "
                f"| {line.median('startup'):.1f} | {lag} "
                f"| {line.median('load'):.1f} | {line.median('busy'):.0%} | {ok} |"
            )
    lines += [
        "",
        "Ratios, kew / peer (median tasks/s; the target of issue 17 is >= 2x Taskiq and "
        ">= 2x FastStream at their defaults):",
        "",
        "| broker | kew line | " + " | ".join(f"vs {p}" for p in PEERS) + " |",
        "|---|---|" + "---:|" * len(PEERS),
    ]
    for broker in brokers:
        peer = {
            p: results[broker, p].median("tasks")
            for p in PEERS
            if (broker, p) in results and results[broker, p].runs
        }
        for system in [s for base in KEW for s in (base, f"{base}@alt")]:
            line = results.get((broker, system))
            if line is None or not line.runs:
                continue
            mine = line.median("tasks")
            cells = " | ".join(_x(mine, peer.get(p)) for p in PEERS)
            lines.append(f"| {broker} | {system} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("-n", type=int, default=int(os.environ.get("BENCH_ASYNC_N", 10000)))
    p.add_argument("--rounds", type=int, default=3, help="runs of each line (median)")
    p.add_argument("--broker", action="append", choices=sorted(URLS))
    p.add_argument("--system", action="append", choices=SYSTEMS, help="repeat; default: all")
    p.add_argument(
        "--alt",
        type=Path,
        metavar="DIR",
        help="also run the kew lines with kew imported from DIR (an earlier checkout, or a "
        "prototype): rows <line>@alt, in the same run",
    )
    p.add_argument("--fill", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.fill:
        fill(args.fill)
        return
    import tempfile

    brokers = args.broker or ["rabbitmq", "redis"]
    systems = [s for s in SYSTEMS if s in (args.system or SYSTEMS)]
    if args.alt is not None:
        args.alt = args.alt.resolve()
        systems += [f"{s}@alt" for s in systems if s in KEW]
    results: dict[tuple[str, str], Line] = {}
    views = {b: BrokerView(b) for b in brokers}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
                for broker in brokers:
                    for system in order:
                        if broker != "rabbitmq" and system.split("@")[0] in RABBIT_ONLY:
                            continue
                        line = results.setdefault((broker, system), Line())
                        print(
                            f"round {rnd + 1}: {broker} / {system}: {args.n} tasks ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        try:
                            run = run_one(
                                system, broker, args.n, Path(tmp), views[broker], args.alt
                            )
                        except Exception as e:
                            line.failed.append(str(e))
                            stem = system.replace("@", "-")
                            show_failure(e, Path(tmp).glob(f"bench-async-{stem}-*.log"))
                            continue
                        line.runs.append(run)
                        print(
                            f"  {run.tasks:,.0f} tasks/s, {run.cpu_us:,.0f} us CPU/task, "
                            f"load {run.load:.1f}, busy {run.busy:.0%}"
                            + ("" if run.ok else f", NOT OK: {run.note}"),
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for view in views.values():
            view.close()
    text = table(results, brokers, args.n, args.rounds, str(args.alt or ""))
    write_report(text, args.out, "async-tasks")


if __name__ == "__main__":
    main()
