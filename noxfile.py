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
    args = session.posargs or ["-q", "-rs", "--durations=15"]
    # pytest exits 5 when it collected no test: that is a failure here.
    session.run("pytest", *args, success_codes=[0])


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
def bench(session: nox.Session) -> None:
    """Benchmarks; writes markdown tables under benchmarks/results/."""
    _install(session, "dev,bench")
    session.run("python", "benchmarks/harness.py", *session.posargs)
    session.run("python", "benchmarks/bench_tasks.py")
    session.run("python", "benchmarks/bench_rabbitmq.py")
