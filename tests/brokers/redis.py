"""A redis-server of the tests' own: on a free port, AOF fsync'd on every
write, in a temp dir; killed with SIGKILL and restarted on the same files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from kew.testing.util import free_port, port_open, wait_for


class RedisServer:
    name = "redis"
    restart_kills_clients = False

    def __init__(self, workdir: Path, *, tls: dict[str, str] | None = None) -> None:
        self.dir = workdir
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0?lease=1&retries=40"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"]]
            args += ["--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        wait_for(lambda: port_open("127.0.0.1", self.port), 20, what="redis-server")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cut_connections(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "CLIENT", "KILL", "TYPE", "normal"],
            capture_output=True,
            check=False,
        )
