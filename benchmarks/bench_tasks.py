"""End-to-end no-op tasks/s through a worker process: kew next to Dramatiq and Celery.

    python benchmarks/bench_tasks.py                 # 5,000 tasks, Redis and RabbitMQ
    python benchmarks/bench_tasks.py -n 20000 --broker redis --system kew --system dramatiq

For each broker (the machine's Redis at 127.0.0.1:6379, RabbitMQ at
127.0.0.1:5672) and each system, in the same run and with the same number of
tasks:

1. a producer process enqueues N no-op tasks (timed: "enqueue/s");
2. a worker process is started the way a user starts it, on that full queue:
   - kew:      ``kew worker bench_tasks:app --concurrency 8`` (prefetch 8; each
               task is acked only after its handler returned; the task layer's
               status events are sent as usual: "queued" at submit, and the
               attempt's end event durable before (or, on a provider with
               ``OutboxConsumer.settle``, in one commit with) the ack)
   - kew-bare: the same with ``App(events=False)``: no status or output
               tracking, like Dramatiq and Celery without a result backend
   - kew-pN, kew-bare-pN: the same with ``--prefetch N`` (kew-p16: the
               prefetch Dramatiq uses with 8 threads)
   - kew@base, kew-bare@base (with ``--baseline DIR``): kew and kew-bare from
               an earlier checkout, for a before/after in the same run
   - Dramatiq: ``dramatiq bench_tasks --processes 1 --threads 8`` (acks after
               the actor returns; its default prefetch of 2 x threads = 16);
               dramatiq-pN: with ``dramatiq_queue_prefetch=N``
   - Celery:   ``celery -A bench_tasks worker -P threads -c 8`` with
               ``task_acks_late=True`` (ack after the task, like the others),
               default prefetch multiplier 4, results ignored;
3. the handler (a no-op that counts) notes the time of the first and the last
   task; "tasks/s" = N / (last - first): the drain rate of a full queue,
   worker start-up excluded.  "worker CPU us/task": the worker process's CPU
   time (every thread) between the first and the last task, per task: far
   steadier than tasks/s on a noisy machine, and what bounds a worker whose
   threads share one GIL.

The worker is then stopped with SIGTERM and the queues deleted.  Results go to
stdout and to benchmarks/results/tasks-<date>.md; the "vs Dramatiq" column is
the ratio to Dramatiq at its defaults on the same broker in the same run, and
"same prefetch" the ratio to the Dramatiq run with the same prefetch (kew's
default is 8, Dramatiq's 16), if one ran.

This module is also the worker-side app of all three systems: with
``BENCH_SYSTEM`` set it declares that system's no-op task at import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from procs import child_env, machine, run_step, show_failure, stop_worker, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

URLS = {
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}
SYSTEMS = ("kew", "kew-bare", "dramatiq", "celery")  # each but celery also as <name>-p<N>
DEFAULT_SYSTEMS = ("kew", "kew-bare", "kew-p16", "kew-p128", "dramatiq", "dramatiq-p128", "celery")
THREADS = 8
# (Celery: its default prefetch multiplier 4 x concurrency 8)
DEFAULT_PREFETCH = {
    "kew": THREADS,
    "kew-bare": THREADS,
    "dramatiq": 2 * THREADS,
    "celery": 4 * THREADS,
}
_SYSTEM = re.compile(r"^(kew|kew-bare|dramatiq|celery)(?:-p([1-9][0-9]*))?$")


def parse_system(name: str) -> tuple[str, int | None]:
    """``"kew-p16"`` -> ``("kew", 16)``; ``"dramatiq"`` -> ``("dramatiq", None)``."""
    m = _SYSTEM.match(name.split("@")[0])
    if m is None or (m[1] == "celery" and m[2]):
        raise ValueError(
            f"unknown system {name!r}: one of {', '.join(SYSTEMS)}, or kew, kew-bare or "
            "dramatiq with -p<N> (prefetch N), e.g. kew-p16"
        )
    return m[1], int(m[2]) if m[2] else None


def prefetch_of(name: str) -> int:
    """The prefetch a system runs with."""
    base, n = parse_system(name)
    return n or DEFAULT_PREFETCH[base]


def _system_arg(name: str) -> str:
    try:
        parse_system(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


# -- worker side: the no-op task of each system ------------------------------------

_lock = threading.Lock()
_seen = 0
_first = 0.0
_cpu_first = 0.0


def noop(n: int = 0) -> None:
    """The task: count, and note the time of the first and last call."""
    global _seen, _first, _cpu_first
    with _lock:
        _seen += 1
        seen = _seen
        if seen == 1:
            _first = time.time()
            _cpu_first = time.process_time()
    if seen == int(os.environ["BENCH_N"]):
        out = Path(os.environ["BENCH_OUT"])
        tmp = out.with_suffix(".tmp")
        cpu = time.process_time() - _cpu_first  # the worker process, every thread
        tmp.write_text(json.dumps({"first": _first, "last": time.time(), "n": seen, "cpu": cpu}))
        tmp.rename(out)


def dramatiq_broker(broker: str) -> Any:
    """A Dramatiq broker on ``broker``'s URL (publisher confirms on
    RabbitMQ), set as Dramatiq's."""
    import dramatiq

    url = URLS[broker]
    b: Any
    if broker == "redis":
        from dramatiq.brokers.redis import RedisBroker

        b = RedisBroker(url=url)
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        b = RabbitmqBroker(url=url, confirm_delivery=True)
    dramatiq.set_broker(b)
    return b


def _build(name: str, broker: str, queue: str) -> dict[str, Any]:
    url = URLS[broker]
    system, _ = parse_system(name)
    if system.startswith("kew"):
        import msgspec

        from kew.task import App

        class Noop(msgspec.Struct):
            n: int = 0

        app = App(
            url,
            store="memory://",
            events_queue=f"{queue}.events",
            name="bench",
            events=system != "kew-bare",
        )
        tq = app.task_queue(queue, Noop, lambda job: noop(job.n))
        return {"app": app, "task": tq}
    if system == "dramatiq":
        import dramatiq

        b = dramatiq_broker(broker)
        actor = dramatiq.actor(noop, queue_name=queue, max_retries=0)
        return {"broker": b, "task": actor}
    if system == "celery":
        from celery import Celery

        app = Celery("bench_tasks", broker=url)
        app.conf.update(
            task_acks_late=True,
            task_ignore_result=True,
            task_default_queue=queue,
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
        )
        task = app.task(name="bench_tasks.noop")(noop)
        return {"app": app, "celery": app, "task": task}
    raise ValueError(system)


if os.environ.get("BENCH_SYSTEM"):
    _built = _build(
        os.environ["BENCH_SYSTEM"], os.environ["BENCH_BROKER"], os.environ["BENCH_QUEUE"]
    )
    globals().update({k: v for k, v in _built.items() if k != "task"})
    task = _built["task"]


# -- producer side ---------------------------------------------------------------------


def enqueue(n: int) -> float:
    """Enqueue n tasks with the current BENCH_SYSTEM; returns tasks/s."""
    system, _ = parse_system(os.environ["BENCH_SYSTEM"])
    t0 = time.perf_counter()
    if system.startswith("kew"):
        data = task.type(0)
        for _ in range(n):
            task.submit(data)
    elif system == "dramatiq":
        for i in range(n):
            task.send(i)
    else:
        for i in range(n):
            task.delay(i)
    return n / (time.perf_counter() - t0)


def cleanup(name: str, broker: str, queue: str) -> None:
    system, _ = parse_system(name)
    if system.startswith("kew"):
        import kew

        url = URLS[broker]
        conn = kew.connect(url)
        for name in (queue, f"{queue}.events", f"{queue}.outcomes"):
            with contextlib.suppress(Exception):
                conn.delete(name)
        conn.close()
        return
    if broker == "redis":
        import redis

        r = redis.Redis.from_url(URLS["redis"])
        keys = [k for pattern in (f"*{queue}*",) for k in r.scan_iter(pattern)]
        if keys:
            r.delete(*keys)
        return
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(URLS["rabbitmq"]))
    ch = conn.channel()
    for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
        ch.queue_delete(name)
    conn.close()


# -- the driver --------------------------------------------------------------------------


def worker_cmd(name: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    system, prefetch = parse_system(name)
    if system.startswith("kew"):
        return [
            sys.executable,
            "-m",
            "kew.cli",
            "worker",
            "bench_tasks:app",
            "--concurrency",
            str(THREADS),
            "--grace",
            "5",
            *(["--prefetch", str(prefetch)] if prefetch else []),
        ]
    if system == "dramatiq":
        return [
            str(bin_dir / "dramatiq"),
            "bench_tasks",
            "--processes",
            "1",
            "--threads",
            str(THREADS),
        ]
    return [
        str(bin_dir / "celery"),
        "-A",
        "bench_tasks",
        "worker",
        "-P",
        "threads",
        "-c",
        str(THREADS),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
    ]


def run_one(system: str, broker: str, n: int, tmp: Path, root: Path = ROOT) -> dict[str, float]:
    """One system on one broker; ``root``: the kew checkout to run it from."""
    here = root / "benchmarks"
    system = system.split("@")[0]
    _, prefetch = parse_system(system)
    queue = f"bench_{system}_{uuid.uuid4().hex[:8]}"
    out = tmp / f"{queue}.json"
    env = child_env(
        here,
        root,
        BENCH_SYSTEM=system,
        BENCH_BROKER=broker,
        BENCH_QUEUE=queue,
        BENCH_N=str(n),
        BENCH_OUT=str(out),
        **({"dramatiq_queue_prefetch": str(prefetch)} if prefetch else {}),
    )
    log = (tmp / f"{queue}.log").open("w")
    try:
        cmd = [sys.executable, str(here / "bench_tasks.py"), "--enqueue", str(n)]
        enq = float(run_step(cmd, env, here, 600, f"{system} enqueue").split()[-1])
        proc = subprocess.Popen(
            worker_cmd(system),
            env=env,
            cwd=here,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + max(120, n / 50)
            while not out.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"{system} worker exited {proc.returncode}: see {log.name}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system} worker did not finish {n} tasks in time")
                time.sleep(0.05)
        finally:
            stop_worker(proc)
        res = json.loads(out.read_text())
        return {
            "enqueue": enq,
            "tasks": n / (res["last"] - res["first"]),
            # (a baseline checkout from before this column has no "cpu")
            "cpu_us": res["cpu"] / max(n - 1, 1) * 1e6 if "cpu" in res else -1.0,
        }
    finally:
        log.close()
        try:
            cleanup(system, broker, queue)
        except Exception as e:
            print(f"cleanup of {queue} failed: {e}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=int(os.environ.get("BENCH_TASKS_N", 5000)))
    p.add_argument("--broker", action="append", choices=sorted(URLS))
    p.add_argument(
        "--system",
        action="append",
        type=_system_arg,
        help=f"{', '.join(SYSTEMS)}, or kew, kew-bare or dramatiq with -p<N> (prefetch N); "
        f"repeat; default: {' '.join(DEFAULT_SYSTEMS)}",
    )
    p.add_argument("--enqueue", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a copy of an earlier kew (git worktree add DIR REV, or git archive REV): its kew "
        "and kew-bare "
        "run too, in the same run, as kew@base and kew-bare@base",
    )
    args = p.parse_args()
    if args.enqueue:
        print(enqueue(args.enqueue))
        return
    import tempfile

    brokers = args.broker or ["redis", "rabbitmq"]
    systems = args.system or list(DEFAULT_SYSTEMS)
    base_rev = ""
    if args.baseline is not None:
        base_rev = (
            subprocess.run(
                ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            or args.baseline.name
        )
        systems = [
            *(f"{s}@base" for s in systems if s.startswith("kew")),
            *systems,
        ]
    results: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for broker in brokers:
            for system in systems:
                print(f"{broker} / {system}: {args.n} tasks ...", file=sys.stderr, flush=True)
                try:
                    root = args.baseline.resolve() if system.endswith("@base") else ROOT
                    results[broker, system] = run_one(system, broker, args.n, Path(tmp), root)
                except Exception as e:
                    show_failure(e, Path(tmp).glob(f"bench_{system}_*.log"))
    lines = [
        f"# No-op tasks through a worker process ({args.n} tasks, {THREADS} threads each)",
        "",
        f"{machine()}; "
        "kew worker --concurrency 8, prefetch 8 (-pN: --prefetch N; "
        "kew-bare: App(events=False))"
        + (f"; @base: the same from kew {base_rev}" if base_rev else "")
        + "; "
        "Dramatiq --processes 1 --threads 8, prefetch 16 (-pN: dramatiq_queue_prefetch=N); "
        "Celery -P threads -c 8, acks_late. tasks/s = drain rate of a full queue.",
        "",
        "| broker | system | prefetch | tasks/s | vs Dramatiq | same prefetch "
        "| worker CPU us/task | enqueue/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for broker in brokers:
        base = results.get((broker, "dramatiq"), {}).get("tasks")
        # Dramatiq's run at each prefetch, for the "same prefetch" ratio
        peers = {
            prefetch_of(s): r["tasks"]
            for (b, s), r in results.items()
            if b == broker and parse_system(s)[0] == "dramatiq"
        }
        for system in systems:
            r = results.get((broker, system))
            n = prefetch_of(system)
            if r is None:
                lines.append(f"| {broker} | {system} | {n} | failed | | | | |")
                continue
            ratio = f"{r['tasks'] / base:.2f}x" if base else "-"
            peer = peers.get(n)
            same = f"{r['tasks'] / peer:.2f}x" if peer else "-"
            cpu = f"{r['cpu_us']:,.0f}" if r["cpu_us"] >= 0 else "-"
            lines.append(
                f"| {broker} | {system} | {n} | {r['tasks']:,.0f} | {ratio} | {same} "
                f"| {cpu} | {r['enqueue']:,.0f} |"
            )
    write_report("\n".join(lines) + "\n", args.out, "tasks")


if __name__ == "__main__":
    main()
