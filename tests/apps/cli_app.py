"""A small task app for the CLI and metrics tests (run by ``kew worker`` in a
subprocess).  Configured by environment: ``CLI_APP_URL`` (broker) and
``CLI_APP_STORE`` (task store)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from kew.task import App, Intervals, Permanent, current


class Greeting(msgspec.Struct):
    name: str
    times: int = 1
    pause: float = 0.0
    mark: str = ""  # a file the handler creates when it starts (tests wait for it)


app = App(
    os.environ.get("CLI_APP_URL", "memory://"),
    name="cli-test",
    store=os.environ.get("CLI_APP_STORE", "memory://"),
)


@app.task("greet", retry=Intervals([0.2]))
def greet(g: Greeting) -> None:
    """Logs a line per time; ``pause`` seconds of work between lines."""
    ctx = current()
    if g.mark:
        Path(g.mark).touch()
    for i in range(g.times):
        if i and g.pause:
            time.sleep(g.pause)  # the task's own work, not a test waiting
        ctx.log(f"hello {g.name} #{i + 1}")


@app.task("flaky", retry=Intervals([0.2]))
def flaky(g: Greeting) -> None:
    """Fails its first attempt, succeeds on the second."""
    if current().attempt == 1:
        raise RuntimeError(f"first attempt for {g.name} fails")
    current().log(f"second attempt for {g.name} works")


@app.task("doomed", retry=Intervals([0.2]))
def doomed(g: Greeting) -> None:
    """Gives up at once."""
    raise Permanent(f"{g.name} can never work")
