"""The chaos driver: tasks through worker processes while things break.

A producer process sends task ids (recording each batch after the broker
accepted it); three worker processes consume them (recording each one they
process).  With a fixed seed the driver SIGKILLs workers at random moments
and restarts them, restarts the broker, and cuts connections.  At the end
every accepted task must have an outcome (processed, or dead-lettered), none
lost; duplicates are counted and must stay below what the kills explain.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import kew

ROOT = Path(__file__).resolve().parents[2]
PREFETCH = 2  # the workers' concurrency (= prefetch)
BATCH = 50  # the producer's batch


class ChaosBroker(Protocol):
    name: str
    url: str
    #: True where "restarting the broker" means killing every client process
    #: (an embedded broker lives in its clients).
    restart_kills_clients: bool

    def restart(self) -> None:
        """SIGKILL the broker and start it again on the same data."""
        ...

    def cut_connections(self) -> None:
        """Close every client connection from the server side (or nothing)."""
        ...


@dataclass
class Summary:
    broker: str
    tasks: int
    kills: int = 0
    restarts: int = 0
    cuts: int = 0
    producer_kills: int = 0
    processed: int = 0
    dead: int = 0
    duplicates: int = 0
    lost: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def allowed_duplicates(self) -> int:
        """What the faults explain: each killed worker may have processed
        its prefetch without acking; each killed or restarted producer may
        resend one batch; each broker restart or cut may lose the acks in
        flight of every worker."""
        return (
            self.kills * PREFETCH
            + self.producer_kills * BATCH
            + (self.restarts + self.cuts) * 3 * PREFETCH
        )

    def line(self) -> str:
        return (
            f"chaos[{self.broker}]: tasks={self.tasks} kills={self.kills} "
            f"restarts={self.restarts} cuts={self.cuts} producer_kills={self.producer_kills} "
            f"processed={self.processed} dead={self.dead} duplicates={self.duplicates} "
            f"(allowed < {self.allowed_duplicates}) lost={self.lost} in {self.seconds:.1f}s"
        )


def _spawn(module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        start_new_session=True,
    )


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()


def _read_ints(path: Path) -> list[int]:
    if not path.exists():
        return []
    # a line cut short by a SIGKILL is not an id
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def run_chaos(
    broker: ChaosBroker,
    workdir: Path,
    *,
    tasks: int = 2000,
    workers: int = 3,
    seed: int = 1234,
    restarts: int = 2,
    cuts: int = 2,
    timeout: float = 240.0,
    worker_module: str = "tests.chaos.worker",
    worker_args: Sequence[str] = (),
) -> Summary:
    """``worker_module`` runs as ``python -m MODULE URL QUEUE WORKDIR *worker_args``
    (``tests.chaos.worker`` by default; ``tests.chaos.idem_worker`` adds
    idempotent side effects)."""
    rng = random.Random(seed)
    queue = f"chaos-{seed}-{os.urandom(3).hex()}"
    log = workdir / "processes.log"
    summary = Summary(broker.name, tasks)
    sent_log, done_log = workdir / "sent.log", workdir / "done.log"
    start = time.monotonic()

    def producer_from(first: int) -> subprocess.Popen[bytes]:
        return _spawn(
            "tests.chaos.producer", broker.url, queue, str(workdir), str(first), str(tasks), log=log
        )

    def next_unsent() -> int:
        sent = _read_ints(sent_log)
        return max(sent) + 1 if sent else 0

    def worker() -> subprocess.Popen[bytes]:
        return _spawn(worker_module, broker.url, queue, str(workdir), *worker_args, log=log)

    conn = kew.connect(broker.url)
    conn.declare(queue)
    conn.close()
    producer = producer_from(0)
    pool = [worker() for _ in range(workers)]
    # the chaos: a plan of events with a fixed seed
    plan = ["restart"] * restarts + ["cut"] * cuts + ["kill"] * (3 * workers)
    rng.shuffle(plan)
    try:
        for event in plan:
            time.sleep(rng.uniform(0.3, 1.2))
            if event == "kill":
                i = rng.randrange(len(pool))
                _kill(pool[i])
                summary.kills += 1
                pool[i] = worker()
            elif event == "cut":
                broker.cut_connections()
                summary.cuts += 1
            else:
                if broker.restart_kills_clients:
                    for p in pool:
                        _kill(p)
                    summary.kills += len(pool)
                    if producer.poll() is None:
                        _kill(producer)
                        summary.producer_kills += 1
                        producer = producer_from(next_unsent())
                    broker.restart()
                    pool = [worker() for _ in range(workers)]
                else:
                    broker.restart()
                    summary.producer_kills += 1  # a send in flight may be resent
                summary.restarts += 1
        # let it finish: every accepted task gets an outcome
        deadline = start + timeout
        browser_conn = None
        while True:
            if producer.poll() is not None and producer.returncode != 0:
                producer = producer_from(next_unsent())
            sent = set(_read_ints(sent_log))
            done = set(_read_ints(done_log))
            dead: set[int] = set()
            try:
                if browser_conn is None:
                    browser_conn = kew.connect(broker.url)
                dead = {
                    int(d.body) for d in kew.Queue(browser_conn, queue, int).dead.list(tasks + 10)
                }
            except Exception:
                browser_conn = None
            if len(sent) == tasks and sent <= done | dead:
                break
            if time.monotonic() > deadline:
                summary.notes.append(
                    f"timed out: sent={len(sent)} done={len(done)} dead={len(dead)}"
                )
                break
            time.sleep(0.2)
    finally:
        for p in [*pool, producer]:
            _kill(p)
    processed = Counter(_read_ints(done_log))
    sent = set(_read_ints(sent_log))
    summary.processed = len(processed)
    summary.dead = len(dead)
    summary.duplicates = sum(n - 1 for n in processed.values())
    summary.lost = len(sent - set(processed) - dead)
    summary.seconds = time.monotonic() - start
    if browser_conn is not None:
        browser_conn.delete(queue)
        browser_conn.close()
    return summary
