"""``kew worker`` (one process, or ``--processes N`` under a supervisor) and
``kew recorder``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from kew.cli._common import WorkerExit, clear_errors, fail, on_signals, one_line
from kew.cli._load import load_app
from kew.cli._logs import log_format_option, log_level_option, setup_logging
from kew.connect import install_hint

log = logging.getLogger("kew.cli")


@click.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Tasks run at once (and taken from the broker ahead: prefetch = this).",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Deliveries held per task queue (fetched ahead or running); default and minimum: "
    "--concurrency.",
)
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    metavar="QUEUE",
    help="Only these task queues (repeat the option); default: all of the app's.",
)
@click.option(
    "--record/--no-record",
    default=False,
    show_default=True,
    help="Also consume task events into the app's store (a recorder in this process).",
)
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Run N worker processes (each with --concurrency threads) under a supervisor "
    "that restarts those that die and passes SIGTERM/SIGINT on.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on this port (with --processes: process n on PORT+n-1).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    metavar="ADDR",
    help="Address the metrics port listens on (0.0.0.0 for every interface).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT: time to finish running tasks before handing them back.",
)
@click.option(
    "--health-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="PATH",
    help="A file that exists while the worker is healthy (every consumer fetching, none "
    "stalled): touched every 2 s, removed when not healthy and on exit. For a liveness "
    "probe such as `test -f PATH`. With --processes, process n keeps PATH.n and PATH "
    "exists while all of them do.",
)
@click.option(
    "--stall-after",
    type=click.FloatRange(min=0.1),
    envvar="KEW_STALL_AFTER",
    default=None,
    metavar="SECONDS",
    help="Advanced: a consumer whose fetches have failed (or that has left work waiting "
    "undelivered) for this long makes the worker unhealthy. Default 60 ($KEW_STALL_AFTER).",
)
@log_level_option()
@log_format_option
def worker(
    app_spec: str,
    concurrency: int,
    prefetch: int | None,
    queues: tuple[str, ...],
    record: bool,
    processes: int,
    metrics_port: int | None,
    metrics_addr: str,
    grace: float,
    health_file: str | None,
    stall_after: float | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run the task queues of MODULE:APP until SIGTERM or SIGINT.

    A first signal stops taking work and lets running tasks finish within
    --grace seconds (then hands them back); a second hands everything back
    and exits at once.  Exit code 0 after a graceful stop; 1 when a
    consumer failed for good (it can never fetch again: the worker stops
    gracefully, and says which queue and why on stderr), or, with
    --processes, when the processes keep dying (more than 5 deaths in 60 s).
    """
    setup_logging(log_level, log_format)
    if prefetch is not None and prefetch < concurrency:
        raise click.BadParameter(
            f"{prefetch} is less than --concurrency ({concurrency})", param_hint="--prefetch"
        )
    if metrics_port is not None:
        _check_metrics()
    app = load_app(app_spec)
    if processes > 1:
        with clear_errors():  # the options, checked once before any process starts
            app.worker(
                concurrency=concurrency,
                queues=list(queues) or None,
                record=record,
                prefetch=prefetch,
            )
        with suppress(Exception):
            app.close()
        params = click.get_current_context().params
        _supervise(params, processes, grace, health_file)
        return
    _watch_supervisor()
    if metrics_port is not None:
        from kew.task import metrics

        with clear_errors("metrics"):
            metrics.install(app)
            metrics.serve(metrics_port, addr=metrics_addr)
    from kew.task.worker import WorkerFailed

    with clear_errors():
        w = app.worker(
            concurrency=concurrency, queues=list(queues) or None, record=record, prefetch=prefetch
        )
        w.grace = grace
        w.health_file = Path(health_file) if health_file is not None else None
        w.stall_after = stall_after
        try:
            w.run()
        except WorkerFailed as e:
            with suppress(Exception):
                app.close()
            raise WorkerExit(one_line(e)) from None
    app.close()


def _check_metrics() -> None:
    """--metrics-port needs prometheus-client: say how to install it."""
    try:
        from kew.task import metrics  # noqa: F401
    except ImportError as e:
        if (e.name or "").split(".")[0] != "prometheus_client":
            raise
        fail(f"--metrics-port needs prometheus-client; install it with: {install_hint('metrics')}")


# -- several processes ---------------------------------------------------------------


def child_command(params: dict[str, Any], n: int) -> list[str]:
    """The ``kew worker`` command line of child ``n`` (1..N): the same
    options minus --processes; its own health file and metrics port."""
    cmd = [sys.executable, "-m", "kew.cli", "worker", params["app_spec"]]
    cmd += ["--concurrency", str(params["concurrency"])]
    if params["prefetch"] is not None:
        cmd += ["--prefetch", str(params["prefetch"])]
    for q in params["queues"]:
        cmd += ["--queue", q]
    if params["record"]:
        cmd.append("--record")
    if params["metrics_port"] is not None:
        port = params["metrics_port"]
        cmd += ["--metrics-port", str(port + n - 1 if port else 0)]
        cmd += ["--metrics-addr", params["metrics_addr"]]
    cmd += ["--grace", repr(params["grace"])]
    if params["health_file"] is not None:
        cmd += ["--health-file", f"{params['health_file']}.{n}"]
    if params["stall_after"] is not None:
        cmd += ["--stall-after", repr(params["stall_after"])]
    cmd += ["--log-level", params["log_level"], "--log-format", params["log_format"]]
    return cmd


def _supervise(
    params: dict[str, Any], processes: int, grace: float, health_file: str | None
) -> None:
    from kew.task._supervisor import Supervisor

    sup = Supervisor(
        lambda n: child_command(params, n), processes, grace=grace, health_file=health_file
    )
    code = sup.run()
    if sup.failure is not None:
        raise WorkerExit(sup.failure)
    if code:
        sys.exit(code)


def _watch_supervisor() -> None:
    """In a child of ``--processes``: stop gracefully (SIGTERM to itself)
    when the supervisor is gone (killed), rather than run on unsupervised."""
    pid = os.environ.pop("KEW_SUPERVISOR_PID", "")
    if not pid.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(pid):
            time.sleep(1.0)
        log.warning("kew worker: its supervisor (pid %s) is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kew-supervisor-watch", daemon=True).start()


# -- recorder ------------------------------------------------------------------------


@click.command()
@click.argument("app_spec", metavar="MODULE:APP")
@log_level_option()
@log_format_option
def recorder(app_spec: str, log_level: str, log_format: str) -> None:
    """Consume MODULE:APP's task events into its store until SIGTERM/SIGINT.

    Run one (or a few) of these so that `kew task`, the REST API and anyone
    else can read task status and output, whichever machine ran the task.
    """
    setup_logging(log_level, log_format)
    app = load_app(app_spec)
    with clear_errors():
        sub = app.recorder()
    stop = threading.Event()
    on_signals(stop.set)
    logging.getLogger("kew.cli").info("kew recorder: %s -> %s", app.name, _store_label(app))
    while not stop.wait(1.0):
        pass
    sub.stop()
    app.close()


def _store_label(app: Any) -> str:
    store = getattr(app, "store", None)
    return str(getattr(store, "url", None) or type(store).__name__)
