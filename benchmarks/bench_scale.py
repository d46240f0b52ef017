"""No-op tasks/s against worker processes: ``kew worker --processes P`` next to
``dramatiq --processes P``, on Redis and on RabbitMQ, in the same run.

    python benchmarks/bench_scale.py                      # P = 1, 2, 4; both brokers
    python benchmarks/bench_scale.py --repeat 3 --own-rabbitmq --system kew \
        --system kew-c8 --system kew-bare --system dramatiq     # docs/deployment.md's run
    python benchmarks/bench_scale.py -n 40000 --broker redis -p 1 -p 2
    python benchmarks/bench_scale.py --replot benchmarks/results/scale-<date>.json

For each repeat, broker, process count P and system (the order of the
systems turns with each repeat, so that none always runs first), with the
same number of tasks N:

1. a producer process pre-fills a queue of its own (``scale_...``) with N
   no-op tasks (not timed: kew's ``Queue.send_many`` in batches, which sends
   the same task messages as ``submit`` without the "queued" events;
   Dramatiq's ``actor.send``);
2. the worker is started the way a user starts it, on that full queue (the
   command lines are bench_tasks.py's, with ``--processes``):
   - kew:      ``kew worker bench_scale:app --processes P``, its defaults
               (``--concurrency 4``, prefetch 4 per process; status events on);
   - kew-c8:   the same with ``--concurrency 8``: Dramatiq's thread count;
   - dramatiq: ``dramatiq bench_scale --processes P --threads 8`` (its default
               threads, prefetch 16 per process);
   - kew-bare (when asked): kew-c8 with ``App(events=False)``, no status kept,
               like Dramatiq;
3. every worker process counts its tasks in 10 ms bins of wall time and
   writes them to a file of its own every 0.1 s; the driver reads the CPU
   from /proc: the user + system time of every process in the worker's
   session (supervisor or main process, children, all their threads),
   sampled every 0.1 s.

Figures: "tasks/s" is the rate while *every* process is draining (from the
last process's first task to the first process's last task: start-up of the
later processes excluded, as is the tail), "drain" is N / (first task to
last task), and "CPU us/task" the CPU of the whole process tree in the same
window as "tasks/s", per task; "cores busy" their product.  "x Dramatiq" is
the ratio to Dramatiq with the same P in the same repeat (the median ratio
over the repeats).  With ``--own-rabbitmq`` the RabbitMQ lines run on a node
the benchmark starts (tests/brokers/rabbitmq.py) instead of the machine's.

The worker is then stopped with SIGTERM (anything left in its session is
killed) and the queues deleted.  The table goes to stdout and to
benchmarks/results/scale-<date>.md (the raw figures to its .json, which
``--replot`` reads), the plot (matplotlib) to docs/deployment-scale.png.

This module is also the worker-side app: with ``SCALE_SYSTEM`` set it
declares the no-op task through bench_tasks.py's ``_build``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # (imported as bench_scale by a worker: already there)
    sys.path.insert(0, str(HERE))

import bench_tasks as bt  # noqa: E402  (the URLs, the apps, the command lines, clean-up)
from procs import python_path, run_step  # noqa: E402

#: system -> (bench_tasks' system, what it is)
SYSTEMS = {
    "kew": ("kew", "kew worker --processes P (defaults: --concurrency 4, prefetch 4)"),
    "kew-c8": ("kew", "kew worker --processes P --concurrency 8 (prefetch 8)"),
    "dramatiq": ("dramatiq", "dramatiq --processes P --threads 8 (prefetch 16)"),
    # (not run unless asked: like Dramatiq, no status kept)
    "kew-bare": ("kew-bare", "kew-c8 with App(events=False): no status events, like Dramatiq"),
}
DEFAULT_SYSTEMS = ("kew", "kew-c8", "dramatiq")
PROCESSES = (1, 2, 4)
BIN = 0.01  # seconds: the width of a worker's count bins
SAMPLE = 0.1  # seconds between CPU samples (driver) and count files (worker)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PLOT = ROOT / "docs" / "deployment-scale.png"
#: Seconds without a task done (start-up included) before a line is given up.
STALL = 30.0


# -- worker side: a no-op task that counts in bins ------------------------------------

_lock = threading.Lock()
_count = 0
_first = 0.0
_last = 0.0
_bins: dict[int, int] = {}


def noop(n: int = 0) -> None:
    """The task: count it in its 10 ms bin; the first call starts the writer."""
    global _count, _first, _last
    t = time.time()
    with _lock:
        _count += 1
        if _count == 1:
            _first = t
            threading.Thread(target=_write_counts, name="scale-counts", daemon=True).start()
        _last = t
        b = int(t / BIN)
        _bins[b] = _bins.get(b, 0) + 1


def _write_counts() -> None:
    """Every SAMPLE seconds, this process's counts to ``$SCALE_OUT/<pid>.json``."""
    out = Path(os.environ["SCALE_OUT"]) / f"{os.getpid()}.json"
    tmp = out.with_suffix(".tmp")
    written = -1
    while True:
        with _lock:
            count, snap = _count, {"first": _first, "last": _last, "bins": dict(_bins)}
        if count != written:
            tmp.write_text(json.dumps({"count": count, **snap}))
            tmp.rename(out)
            written = count
        time.sleep(SAMPLE)


if os.environ.get("SCALE_SYSTEM"):
    # bench_tasks' apps call its module-level `noop` (kew through a lambda, Dramatiq
    # as the actor's function): this module's counting one instead.
    bt.noop = noop
    _built = bt._build(
        os.environ["SCALE_SYSTEM"], os.environ["SCALE_BROKER"], os.environ["SCALE_QUEUE"]
    )
    globals().update({k: v for k, v in _built.items() if k != "task"})
    task = _built["task"]


def prefill(n: int) -> float:
    """Queue n tasks with the current SCALE_SYSTEM; returns the seconds it took."""
    t0 = time.perf_counter()
    if os.environ["SCALE_SYSTEM"].startswith("kew"):
        data, batch = task.type(0), 1000
        for i in range(0, n, batch):
            task.queue.send_many([data] * min(batch, n - i))
        _built["app"].close()
    else:
        b = _built["broker"]
        # Pre-fill only (the worker is another process, with confirms, and sends
        # nothing): RabbitMQ publishes unconfirmed, flushed by the close below.
        b.confirm_delivery = False
        for i in range(n):
            task.send(i)
        b.close()
    return time.perf_counter() - t0


# -- driver side -----------------------------------------------------------------------


def worker_cmd(system: str, processes: int) -> list[str]:
    """bench_tasks.py's command line for the system, on this module, with P processes."""
    base = SYSTEMS[system][0]
    rename = {"bench_tasks:app": "bench_scale:app", "bench_tasks": "bench_scale"}
    cmd = [rename.get(a, a) for a in bt.worker_cmd(base)]
    if system == "kew":  # kew's own default concurrency (bench_tasks sets 8)
        i = cmd.index("--concurrency")
        del cmd[i : i + 2]
    if base == "dramatiq":
        cmd[cmd.index("--processes") + 1] = str(processes)
    else:  # kew, kew-c8, kew-bare
        cmd += ["--processes", str(processes)]
    return cmd


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system, reaped children included) of every process
    in session ``sid``."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        rest = stat[stat.rindex(b")") + 2 :].split()
        # rest[0] is field 3 (state): session is field 6, utime..cstime 14..17
        if int(rest[3]) == sid:
            ticks += int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ticks / CLK_TCK


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


class CpuSampler(threading.Thread):
    """(wall time, CPU seconds of the session) every SAMPLE seconds."""

    def __init__(self, sid: int) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.sid = sid
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((time.time(), session_cpu(self.sid)))
            self.stopping.wait(SAMPLE)

    def after(self, t: float) -> bool:
        """Whether a sample was taken after wall time t."""
        return bool(self.samples) and self.samples[-1][0] > t

    def at(self, t: float) -> float:
        """The session's CPU seconds at wall time t (linear between samples)."""
        s = self.samples
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        raise ValueError(f"no CPU samples around {t} ({s[0][0]} to {s[-1][0]})")


@dataclass
class Result:
    tasks: float  # tasks/s while every process drains
    drain: float  # N / (first task to last task)
    cpu_us: float  # CPU us per task in the `tasks` window
    window: float  # seconds of that window
    prefill: float  # seconds
    seen: int = 0  # worker processes that ran tasks (0: not recorded)


def measure(counts: list[dict[str, Any]], n: int, cpu: CpuSampler) -> Result:
    first = min(c["first"] for c in counts)
    last = max(c["last"] for c in counts)
    drain = n / (last - first)
    # the window in which every process drains: whole bins strictly inside it
    lo = int(max(c["first"] for c in counts) / BIN) + 1
    hi = int(min(c["last"] for c in counts) / BIN)
    if hi - lo < 50:  # under 0.5 s: too short to say anything; the whole drain
        lo, hi = int(first / BIN), int(last / BIN) + 1
    done = sum(k for c in counts for b, k in c["bins"].items() if lo <= int(b) < hi)
    window = (hi - lo) * BIN
    cpu_s = cpu.at(hi * BIN) - cpu.at(lo * BIN)
    return Result(done / window, drain, cpu_s / done * 1e6, window, 0.0, len(counts))


def run_one(system: str, broker: str, processes: int, n: int, tmp: Path) -> Result:
    base = SYSTEMS[system][0]
    queue = f"scale_{system.replace('-', '')}_p{processes}_{uuid.uuid4().hex[:8]}"
    out = tmp / queue
    out.mkdir()
    # (not BENCH_SYSTEM: bench_tasks would build its own app at import)
    env = {k: v for k, v in os.environ.items() if k != "BENCH_SYSTEM" and k[:6] != "SCALE_"}
    env |= {
        "SCALE_SYSTEM": base,
        "SCALE_BROKER": broker,
        "SCALE_QUEUE": queue,
        "SCALE_OUT": str(out),
        "PYTHONPATH": python_path(HERE, ROOT),
    }
    log = (tmp / f"{queue}.log").open("w")
    try:
        cmd = [sys.executable, str(HERE / "bench_scale.py"), "--prefill", str(n)]
        filled = float(run_step(cmd, env, HERE, 900, f"{system} pre-fill").split()[-1])
        proc = subprocess.Popen(
            worker_cmd(system, processes),
            env=env,
            cwd=HERE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its session: the processes whose CPU counts
        )
        cpu = CpuSampler(proc.pid)
        cpu.start()
        try:
            got, moved = 0, time.monotonic()
            while True:
                counts = []
                for f in out.glob("*.json"):
                    with contextlib.suppress(OSError, ValueError):
                        counts.append(json.loads(f.read_text()))
                if sum(c["count"] for c in counts) >= n:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{system} worker exited {proc.returncode}: see {log.name}")
                if sum(c["count"] for c in counts) > got:
                    got, moved = sum(c["count"] for c in counts), time.monotonic()
                elif time.monotonic() - moved > STALL:
                    raise RuntimeError(f"{system} worker stuck at {got} of {n} tasks for {STALL} s")
                time.sleep(SAMPLE)
            last = max(c["last"] for c in counts)
            while not cpu.after(last + BIN):  # a CPU sample after the last task
                time.sleep(SAMPLE / 2)
        finally:
            cpu.stopping.set()
            cpu.join()
            stop(proc)
        res = measure(counts, n, cpu)
        res.prefill = filled
        return res
    finally:
        log.close()
        try:
            bt.cleanup(base, broker, queue)
        except Exception as e:
            print(f"clean-up of {queue} failed: {e}", file=sys.stderr)


@contextlib.contextmanager
def own_rabbitmq(tmp: Path) -> Iterator[None]:
    """A RabbitMQ node of the tests' kind for the RabbitMQ lines (its URL in
    bench_tasks' URLS and in $BENCH_AMQP_URL for the workers)."""
    sys.path.insert(0, str(ROOT))
    from tests.brokers.rabbitmq import RabbitMQServer

    (tmp / "rabbitmq").mkdir()
    node = RabbitMQServer(tmp / "rabbitmq")
    node.start()
    try:
        url = f"amqp://guest:guest@127.0.0.1:{node.port}/"
        print(f"own RabbitMQ node at {url}", file=sys.stderr)
        os.environ["BENCH_AMQP_URL"] = bt.URLS["rabbitmq"] = url
        yield
    finally:
        node.kill()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker (its supervisor passes it on); then SIGKILL to
    whatever is left in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


# -- the report ----------------------------------------------------------------------------

Key = tuple[str, str, int]  # broker, system, processes
Runs = dict[Key, dict[int, Result]]  # -> repeat number -> result


def table(runs: Runs, brokers: list[str], systems: list[str], procs: list[int]) -> list[str]:
    lines = [
        "| broker | system | processes | tasks/s | x Dramatiq same P | CPU us/task "
        "| cores busy | drain tasks/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for broker in brokers:
        for p in procs:
            peer = runs.get((broker, "dramatiq", p), {})
            for system in systems:
                by_rep = runs.get((broker, system, p), {})
                rs = list(by_rep.values())
                if not rs:
                    lines.append(f"| {broker} | {system} | {p} | failed | | | | |")
                    continue
                # ratio per repeat (the same repeat ran both), then the median
                pairs = [r.tasks / peer[i].tasks for i, r in by_rep.items() if i in peer]
                ratio = f"{statistics.median(pairs):.2f}x" if pairs else "-"
                tasks = _median_range([r.tasks for r in rs])
                cpu = statistics.median(r.cpu_us for r in rs)
                drain = statistics.median(r.drain for r in rs)
                # CPU seconds per second: how much of the machine's cores the worker used
                busy = statistics.median(r.tasks * r.cpu_us / 1e6 for r in rs)
                lines.append(
                    f"| {broker} | {system} | {p} | {tasks} | {ratio} | {cpu:,.0f} "
                    f"| {busy:.2f} | {drain:,.0f} |"
                )
    return lines


def _median_range(xs: list[float]) -> str:
    m = f"{statistics.median(xs):,.0f}"
    return m if len(xs) == 1 else f"{m} ({min(xs):,.0f}-{max(xs):,.0f})"


def plot(
    runs: Runs,
    brokers: list[str],
    systems: list[str],
    procs: list[int],
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "kew": "tab:blue",
        "kew-c8": "tab:green",
        "kew-bare": "tab:purple",
        "dramatiq": "tab:orange",
    }
    markers = {"kew": "o", "kew-c8": "s", "kew-bare": "D", "dramatiq": "^"}
    fig, axes = plt.subplots(
        1, len(brokers), figsize=(4.2 * len(brokers) + 0.6, 4.2), dpi=110, squeeze=False
    )
    cores = os.cpu_count() or 0
    for ax, broker in zip(axes[0], brokers, strict=True):
        for k, system in enumerate(systems):
            ps = [p for p in procs if runs.get((broker, system, p))]
            dodge = 0.05 * (k - (len(systems) - 1) / 2)  # the systems' bars side by side
            if not ps:
                continue
            xs = [[r.tasks for r in runs[broker, system, p].values()] for p in ps]
            med = [statistics.median(x) for x in xs]
            lo = [m - min(x) for m, x in zip(med, xs, strict=True)]
            hi = [max(x) - m for m, x in zip(med, xs, strict=True)]
            ax.errorbar(
                [p + dodge for p in ps],
                med,
                yerr=[lo, hi],
                marker=markers.get(system, "o"),
                color=colours.get(system),
                capsize=3,
                label=system,
            )
        ax.axvline(cores, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(
            f"{cores} cores",
            (cores, 0),
            xytext=(3, 3),
            textcoords="offset points",
            color="grey",
            fontsize=8,
        )
        ax.set_xticks(procs)
        ax.set_xlabel("worker processes")
        ax.set_ylim(bottom=0)
        ax.set_title(broker)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("no-op tasks/s (every process draining)")
    runs_n = max((len(r) for r in runs.values()), default=1)
    bars = f"; bars: the lowest and highest of {runs_n} runs" if runs_n > 1 else ""
    fig.suptitle(f"{title} (median{bars})" if bars else title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_all(args: argparse.Namespace) -> tuple[Runs, list[str]]:
    """Every line, interleaved: repeat > broker > processes > system (turned)."""
    import tempfile

    runs: Runs = {}
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.own_rabbitmq and "rabbitmq" in args.broker:
            stack.enter_context(own_rabbitmq(tmp))
        for rep in range(args.repeat):
            k = rep % len(args.system)
            for broker in args.broker:
                for procn in args.processes:
                    for system in args.system[k:] + args.system[:k]:
                        print(
                            f"[{rep + 1}/{args.repeat}] {broker} / {system} / {procn} "
                            f"processes: {args.n} tasks ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        for attempt in range(1 + args.retries):
                            try:
                                r = run_one(system, broker, procn, args.n, tmp)
                            except Exception as e:
                                again = " (again)" if attempt < args.retries else ""
                                print(f"  failed: {e}{again}", file=sys.stderr)
                                failures.append(f"{broker} / {system} / {procn}: {e}")
                                continue
                            print(
                                f"  {r.tasks:,.0f} tasks/s ({r.window:.1f} s window; drain "
                                f"{r.drain:,.0f}/s), {r.cpu_us:,.0f} us CPU/task, pre-fill "
                                f"{r.prefill:.1f} s; {r.seen} processes ran tasks",
                                file=sys.stderr,
                                flush=True,
                            )
                            runs.setdefault((broker, system, procn), {})[rep] = r
                            break
    if "redis" in args.broker and "dramatiq" in args.system:
        import redis

        # Dramatiq's workers' heartbeats, the one key of its not named after a queue
        redis.Redis.from_url(bt.URLS["redis"]).delete("dramatiq:__heartbeats__")
    return runs, failures


def report(runs: Runs, failures: list[str], meta: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown table with its header."""
    head = (
        f"{meta['when']}, {meta['host']}, {meta['cpus']} CPUs, Python {meta['python']}; "
        f"{meta['n']:,} no-op tasks per line, {meta['repeat']} run(s) each (median; range in "
        f"brackets); load average {meta['load'][0]:.1f} before, {meta['load'][1]:.1f} after; "
        f"the run took {meta['took'] / 60:.1f} min."
    )
    lines = [
        f"# No-op tasks/s against worker processes ({meta['n']:,} tasks per line)",
        "",
        head,
        *([meta["note"]] if meta["note"] else []),
        f"RabbitMQ: {meta['rabbitmq']}; kew from {meta['root']}.",
        "",
        *(f"- {name}: {what}" for name, (_, what) in SYSTEMS.items() if name in args.system),
        "",
        "tasks/s: while every process drains; CPU us/task: every process of the worker "
        "(supervisor, children, all threads) in that window; cores busy: tasks/s x CPU "
        "us/task (the worker's share of the machine); drain: N / first to last task.",
        "",
        *table(runs, args.broker, args.system, args.processes),
        *(["", "Failed attempts (run again):", *(f"- {f}" for f in failures)] if failures else []),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=int(os.environ.get("BENCH_SCALE_N", 15000)))
    p.add_argument("--broker", action="append", choices=sorted(bt.URLS))
    p.add_argument(
        "--system",
        action="append",
        choices=list(SYSTEMS),
        help=f"repeat; default: {' '.join(DEFAULT_SYSTEMS)}",
    )
    p.add_argument("-p", "--processes", action="append", type=int, metavar="P")
    p.add_argument("--repeat", type=int, default=1, help="runs of each line (median shown)")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="runs of a failed line again (a queue deleted by someone else, say)",
    )
    p.add_argument(
        "--own-rabbitmq",
        action="store_true",
        help="run the RabbitMQ lines on a node of the benchmark's own (tests/brokers/rabbitmq.py, "
        "free loopback ports), not the machine's: a pytest session ending meanwhile deletes "
        "every queue made on the machine's node during it (tests/conftest.py)",
    )
    p.add_argument("--note", default="", help="a line for the table's header (what kew ran)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--plot", type=Path, default=PLOT, help=f"the PNG (default {PLOT})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="no run: the table and plot again from the .json an earlier run wrote",
    )
    p.add_argument("--prefill", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prefill:
        print(prefill(args.prefill))
        return
    args.broker = args.broker or ["redis", "rabbitmq"]
    args.system = args.system or list(DEFAULT_SYSTEMS)
    args.processes = sorted(set(args.processes or PROCESSES))
    if args.replot:
        saved = json.loads(args.replot.read_text())
        meta, failures = saved["meta"], saved["failures"]
        runs: Runs = {
            (b, s, int(p)): {int(i): Result(**r) for i, r in reps.items()}
            for b, s, p, reps in saved["runs"]
        }
        args.broker, args.system, args.processes = meta["brokers"], meta["systems"], meta["procs"]
        stamp = args.replot.stem.removeprefix("scale-")
    else:
        started, load0 = time.monotonic(), os.getloadavg()[0]
        runs, failures = run_all(args)
        when = datetime.now(UTC)
        stamp = f"{when:%Y%m%d-%H%M}"
        meta = {
            "when": f"{when:%Y-%m-%d %H:%M UTC}",
            "day": f"{when:%Y-%m-%d}",
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "n": args.n,
            "repeat": args.repeat,
            "load": [load0, os.getloadavg()[0]],
            "took": time.monotonic() - started,
            "note": args.note,
            "rabbitmq": "a node of the benchmark's own" if args.own_rabbitmq else "the machine's",
            "root": str(ROOT),
            "brokers": args.broker,
            "systems": args.system,
            "procs": args.processes,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        raw = [[b, s, p, {i: vars(r) for i, r in reps.items()}] for (b, s, p), reps in runs.items()]
        (args.out / f"scale-{stamp}.json").write_text(
            json.dumps({"meta": meta, "failures": failures, "runs": raw}, indent=1)
        )
    text = report(runs, failures, meta, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{stamp}.md"
    path.write_text(text)
    print(f"written to {path} (and its .json)", file=sys.stderr)
    if not args.no_plot and runs:
        title = (
            f"No-op tasks/s, {meta['n']:,} tasks per point, {meta['cpus']}-core shared VM, "
            f"{meta['day']}"
        )
        plot(runs, args.broker, args.system, args.processes, args.plot, title)
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
