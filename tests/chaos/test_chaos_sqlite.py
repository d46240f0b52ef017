"""Chaos on the embedded SQLite broker: "restarting the broker" kills every
process that has the file open (there is no server), then starts them again."""

import os
from pathlib import Path

from tests.chaos.driver import run_chaos


class SqliteChaos:
    name = "sqlite"
    restart_kills_clients = True

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}?lease=1"

    def restart(self) -> None:
        pass  # the driver kills every client; the file is the broker

    def cut_connections(self) -> None:
        pass  # no connections to cut


def test_chaos_sqlite(tmp_path: Path) -> None:
    tasks = int(os.environ.get("KEW_CHAOS_TASKS", "2000"))
    s = run_chaos(SqliteChaos(tmp_path / "chaos.sqlite3"), tmp_path, tasks=tasks, cuts=0)
    print("\n" + s.line())
    assert not s.notes, s.notes
    assert s.lost == 0
    assert s.processed + s.dead >= tasks
    assert s.dead == len([t for t in range(tasks) if t % 97 == 0])
    assert s.duplicates < s.allowed_duplicates
