"""Long tasks on two workers: the makespan, kew worker next to Dramatiq, each at its defaults.

    python benchmarks/bench_makespan.py [--broker rabbitmq --broker redis] [--rounds 2]

The scene of tests/test_task_hoarding.py, with worker processes started the
way a user starts them: 8 tasks of 1 s each are queued; a first worker
starts, a second one 0.2 s later, each running 2 tasks at once:

  kew       ``kew worker bench_makespan:app --concurrency 2`` (its default,
            adaptive window: the concurrency when tasks are slow)
  Dramatiq  ``dramatiq bench_makespan --processes 1 --threads 2`` (its
            default prefetch: twice its threads)

Ideally the 8 tasks take 2 s (4 at a time).  A worker that holds more tasks
than it runs keeps them from the other one: the second worker idles while
the first works through its hoard (up to 4 s).  "makespan" is the time from
the first task's start to the last task's end (the workers' start-up left
out); "tasks run" how many each worker ran (first / second).  The lines run
interleaved, ``--rounds`` times over (each round: every broker, every
system), and the table gives every round.  The queues made are deleted.
Writes benchmarks/results/makespan-<date>.md too.

This module is also the workers' app: with ``MAKESPAN_SYSTEM`` set it
declares that system's 1-second task at import.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_tasks import URLS, cleanup, dramatiq_broker  # noqa: E402
from procs import (  # noqa: E402
    child_env,
    machine,
    run_step,
    show_failure,
    stop_worker,
    write_report,
)

TASKS = int(os.environ.get("MAKESPAN_TASKS", "8"))  # --tasks (children read the env)
TASK_SECONDS = 1.0
CONCURRENCY = 2
SECOND_AFTER = 0.2  # seconds between the two workers' start
SYSTEMS = ("kew", "dramatiq")


# -- worker side -------------------------------------------------------------------------


def work(n: int = 0) -> None:
    """The task: 1 s of work, then a line ``worker start end`` in the out file."""
    start = time.time()
    time.sleep(TASK_SECONDS)
    line = f"{os.environ['MAKESPAN_WORKER']} {start:.6f} {time.time():.6f}\n"
    fd = os.open(os.environ["MAKESPAN_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write: whole lines from both workers
    finally:
        os.close(fd)


def _build(system: str, broker: str, queue: str) -> dict[str, Any]:
    if system == "kew":
        from kew.task import App

        app = App(URLS[broker], store="memory://", events_queue=f"{queue}.events", name="makespan")
        return {"app": app, "task": app.task_queue(queue, int, work)}
    import dramatiq

    b = dramatiq_broker(broker)
    return {"broker": b, "task": dramatiq.actor(work, queue_name=queue, max_retries=0)}


if os.environ.get("MAKESPAN_SYSTEM"):
    _built = _build(
        os.environ["MAKESPAN_SYSTEM"], os.environ["MAKESPAN_BROKER"], os.environ["MAKESPAN_QUEUE"]
    )
    globals().update({k: v for k, v in _built.items() if k != "task"})
    task = _built["task"]


def enqueue() -> None:
    """Queue the tasks with the current MAKESPAN_SYSTEM."""
    if os.environ["MAKESPAN_SYSTEM"] == "kew":
        task.submit_many(list(range(TASKS)))
    else:
        for i in range(TASKS):
            task.send(i)


# -- the driver --------------------------------------------------------------------------


def worker_cmd(system: str) -> list[str]:
    if system == "kew":
        return [
            sys.executable,
            "-m",
            "kew.cli",
            "worker",
            "bench_makespan:app",
            "--concurrency",
            str(CONCURRENCY),
            "--grace",
            "5",
        ]
    dramatiq = Path(sys.executable).parent / "dramatiq"
    return [str(dramatiq), "bench_makespan", "--processes", "1", "--threads", str(CONCURRENCY)]


def run_one(system: str, broker: str, tmp: Path) -> dict[str, Any]:
    """One run: the makespan (s) and the tasks each worker ran."""
    queue = f"makespan_{system}_{uuid.uuid4().hex[:8]}"
    out = tmp / f"{queue}.txt"
    env = child_env(
        HERE,
        ROOT,
        MAKESPAN_SYSTEM=system,
        MAKESPAN_BROKER=broker,
        MAKESPAN_QUEUE=queue,
        MAKESPAN_OUT=str(out),
    )
    logs = [(tmp / f"{queue}-{w}.log").open("w") for w in ("first", "second")]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cmd = [sys.executable, str(HERE / "bench_makespan.py"), "--enqueue"]
        run_step(cmd, env, HERE, 120, f"{system} enqueue")
        for i, (name, log) in enumerate(zip(("first", "second"), logs, strict=True)):
            if i:
                time.sleep(SECOND_AFTER)
            procs.append(
                subprocess.Popen(
                    worker_cmd(system),
                    env={**env, "MAKESPAN_WORKER": name},
                    cwd=HERE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        lines: list[str] = []
        while len(lines) < TASKS:
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"{system} worker exited {p.returncode}: see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system}: {len(lines)} of {TASKS} tasks ran in time")
            time.sleep(0.05)
            lines = out.read_text().splitlines() if out.exists() else []
    finally:
        for p in procs:
            stop_worker(p)
        for log in logs:
            log.close()
        try:
            cleanup(system, broker, queue)
        except Exception as e:
            print(f"cleanup of {queue} failed: {e}", file=sys.stderr)
    ran = [(w, float(s), float(e)) for w, s, e in (line.split() for line in lines)]
    return {
        "makespan": max(e for _, _, e in ran) - min(s for _, s, _ in ran),
        "first": sum(w == "first" for w, _, _ in ran),
        "second": sum(w == "second" for w, _, _ in ran),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", action="append", choices=sorted(URLS))
    p.add_argument("--system", action="append", choices=SYSTEMS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tasks", type=int, default=8, help="tasks of 1 s (default 8)")
    p.add_argument("--enqueue", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    globals()["TASKS"] = args.tasks
    os.environ["MAKESPAN_TASKS"] = str(args.tasks)
    if args.enqueue:
        enqueue()
        return
    import tempfile

    brokers = args.broker or ["rabbitmq", "redis"]
    systems = args.system or list(SYSTEMS)
    load = os.getloadavg()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for broker in brokers:
                for system in systems:
                    print(f"round {rnd + 1}: {broker} / {system} ...", file=sys.stderr, flush=True)
                    try:
                        res = run_one(system, broker, Path(tmp))
                    except Exception as e:
                        show_failure(e, Path(tmp).glob(f"makespan_{system}_*.log"))
                        res = {}
                    results.setdefault((broker, system), []).append(res)
    after = os.getloadavg()
    ideal = TASKS * TASK_SECONDS / (2 * CONCURRENCY)
    lines = [
        f"# Makespan: {TASKS} tasks of {TASK_SECONDS:g} s on two workers of concurrency "
        f"{CONCURRENCY}, the second started {SECOND_AFTER:g} s after the first",
        "",
        f"{machine()}, load average {load[0]:.1f} (after: "
        f"{after[0]:.1f}); kew worker --concurrency {CONCURRENCY} (default window); "
        f"Dramatiq --processes 1 --threads {CONCURRENCY} (default prefetch "
        f"{2 * CONCURRENCY}). Ideal makespan {ideal:g} s; makespan = first task's start to "
        "last task's end.",
        "",
        "| broker | system | makespan s (each round) | vs Dramatiq | tasks run: first / second |",
        "|---|---|---:|---:|---|",
    ]
    for broker in brokers:
        base = [r.get("makespan") for r in results.get((broker, "dramatiq"), [])]
        for system in systems:
            runs = results.get((broker, system), [])
            spans = ", ".join(f"{r['makespan']:.2f}" if r else "failed" for r in runs)
            ratios = [
                f"{r['makespan'] / b:.2f}x"
                for r, b in zip(runs, base, strict=False)
                if r and b and system != "dramatiq"
            ]
            split = ", ".join(f"{r['first']} / {r['second']}" if r else "-" for r in runs)
            lines.append(
                f"| {broker} | {system} | {spans} | {', '.join(ratios) or '-'} | {split} |"
            )
    write_report("\n".join(lines) + "\n", args.out, "makespan")


if __name__ == "__main__":
    main()
