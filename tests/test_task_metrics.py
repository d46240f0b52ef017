"""Prometheus metrics of a ``kew worker --metrics-port`` subprocess match what
happened (tasks started, succeeded, retried, failed; durations; queue depth)."""

from __future__ import annotations

import re
import urllib.request

from kew.testing.util import free_port, wait_for
from tests.test_task_cli_worker import APP, Env, stop
from tests.test_task_cli_worker import env as env  # the fixture


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of metric ``name`` with exactly these labels, if exported."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


def test_worker_metrics_count_what_happened(env: Env) -> None:
    port = free_port()
    # Two tasks wait on a queue that this worker does not run: queue depth.
    for name in ("q1", "q2"):
        assert env.kew("send", "--app", APP, "doomed", f'{{"name": "{name}"}}').returncode == 0
    proc = env.worker(
        "--record", "--metrics-port", str(port), "--queue", "greet", "--queue", "flaky"
    )
    try:
        wait_for(lambda: _up(port), 30, what="the metrics port")
        ids = [
            env.kew("send", "--app", APP, "greet", '{"name": "a"}').stdout.strip() for _ in range(3)
        ]
        ids.append(env.kew("send", "--app", APP, "flaky", '{"name": "b"}').stdout.strip())
        wait_for(lambda: all(env.status(i) == "succeeded" for i in ids), 60, what="tasks done")

        def counted() -> str | None:
            text = scrape(port)
            done = sample(text, "kew_tasks_succeeded_total", queue="flaky") == 1
            return text if done else None

        text = wait_for(counted, 20, what="the counters")
        assert sample(text, "kew_tasks_started_total", queue="greet") == 3
        assert sample(text, "kew_tasks_succeeded_total", queue="greet") == 3
        assert sample(text, "kew_tasks_started_total", queue="flaky") == 2
        assert sample(text, "kew_tasks_retried_total", queue="flaky") == 1
        assert sample(text, "kew_tasks_succeeded_total", queue="flaky") == 1
        assert sample(text, "kew_tasks_failed_total", queue="flaky") in (None, 0)
        assert sample(text, "kew_tasks_started_total", queue="doomed") is None
        count = sample(text, "kew_task_duration_seconds_count", queue="greet", outcome="succeeded")
        assert count == 3
        assert (
            sample(text, "kew_task_duration_seconds_count", queue="flaky", outcome="retried") == 1
        )
        # Depth, read from the broker at scrape time.
        assert sample(text, "kew_queue_depth", queue="doomed", state="ready") == 2
        assert sample(text, "kew_queue_depth", queue="greet", state="ready") == 0
        assert sample(text, "kew_queue_depth", queue="greet", state="dead") == 0
        code, err = stop(proc)
        assert code == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def test_render_in_process_counts_an_apps_tasks() -> None:
    """``install`` + ``render`` (the web /metrics endpoint's path), with a
    real App and Worker in this process on memory://."""
    import msgspec

    from kew.task import App, metrics

    class Job(msgspec.Struct):
        n: int

    app = App("memory://", store="memory://", name="metrics-test")
    seen: list[int] = []
    jobs = app.task_queue("metrics-jobs", Job, lambda j: seen.append(j.n))
    assert metrics.install(app) is metrics.install(app)  # idempotent
    before = sample(metrics.render().decode(), "kew_tasks_succeeded_total", queue="metrics-jobs")
    worker = app.worker(concurrency=2).start()
    try:
        ids = [jobs.submit(Job(i)) for i in range(5)]
        wait_for(lambda: len(seen) == 5, 15, what="5 jobs")

        def rendered() -> str | None:
            text = metrics.render().decode()
            n = sample(text, "kew_tasks_succeeded_total", queue="metrics-jobs")
            return text if n == (before or 0) + 5 else None

        text = wait_for(rendered, 10, what="5 successes counted")
        assert sample(text, "kew_queue_depth", queue="metrics-jobs", state="ready") == 0
        assert len(ids) == 5
    finally:
        worker.stop(5)
        app.close()
