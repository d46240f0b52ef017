"""Sessions: tests, lint, typecheck, demo, bench.

python3 -m pip install nox && python3 -m nox -s tests
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install("--quiet", "--disable-pip-version-check", "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, on every broker (installs what it needs)."""
    _install(session)
    setup = ROOT / "scripts" / "setup-test-brokers"
    if setup.exists():
        session.run("bash", str(setup), external=True)
    # The longest chaos and soak runs (marked slow) run on demand: nox -s slow.
    args = session.posargs or ["-q", "-rs", "--durations=30", "-m", "not slow"]
    # pytest exits 5 when it collected no test: that is a failure here.
    session.run("pytest", *args, success_codes=[0])


@nox.session
def slow(session: nox.Session) -> None:
    """The tests marked slow: the chaos runs on the clusters and broker
    pairs, the STOMP delay-queue expiry (each cluster's conformance and one
    failover run are in the tests session)."""
    _install(session)
    setup = ROOT / "scripts" / "setup-test-brokers"
    if setup.exists():
        session.run("bash", str(setup), external=True)
    session.run("pytest", "-q", "-rs", "-m", "slow", *session.posargs, success_codes=[0])


@nox.session
def lint(session: nox.Session) -> None:
    session.install("--quiet", "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The main demo, on the embedded SQLite default: no broker to install."""
    _install(session, "demo" if (ROOT / "examples" / "omero_import").exists() else "dev")
    script = os.environ.get("KEW_DEMO", "examples/demo.py")
    session.run("python", script, *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site with its API reference, into site/; ``mkdocs build
    --strict``: a warning (a broken link, a reference to a gone object) fails it."""
    _install(session, "docs")
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about MkDocs 2
    session.run("mkdocs", "build", "--strict", "--clean", "--site-dir", "site", *session.posargs)


BENCHMARKS = {
    "sqlite": "benchmarks/harness.py",
    "redis": "benchmarks/bench_redis.py",
    "rabbitmq": "benchmarks/bench_rabbitmq.py",
    "artemis": "benchmarks/bench_artemis.py",
    "tasks": "benchmarks/bench_tasks.py",
    "scale": "benchmarks/bench_scale.py",
    "floor": "benchmarks/floor_pika.py",
    "validate": "benchmarks/bench_validate.py",
    "aio": "benchmarks/bench_aio.py",
    "async-tasks": "benchmarks/bench_async_tasks.py",
    "submit": "benchmarks/bench_submit.py",
    "makespan": "benchmarks/bench_makespan.py",
    "stomp-aio": "benchmarks/bench_stomp_aio.py",
}


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, each kew next to its raw client (and Dramatiq/Celery) in
    one run; tables under benchmarks/results/.  ``-- NAME [ARGS...]`` runs one
    (a key of BENCHMARKS) with its own arguments."""
    _install(session, "dev,bench")
    args = list(session.posargs)
    if args and args[0] in BENCHMARKS:
        session.run("python", BENCHMARKS[args[0]], *args[1:])
        return
    if args:
        session.error(f"unknown benchmark {args[0]!r}; known: {', '.join(BENCHMARKS)}")
    for script in BENCHMARKS.values():
        session.run("python", script)
