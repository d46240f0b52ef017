"""A RabbitMQ node of the tests' own: its own node name, AMQP, AMQPS and
distribution ports (free, loopback only), its own Mnesia/log dirs, config,
plugins file and Erlang cookie in a temp dir.  Started in the background
(no ``-detached``, in its own process group), killed with SIGKILL by that
group and restarted on the same data (durable queues and persistent
messages survive).  Not the machine's shared node: nothing here touches it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from kew.testing.util import free_port, port_open, wait_for
from tests.brokers.tls import make_certs

BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitMQServer:
    name = "rabbitmq"
    restart_kills_clients = False

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.ssl_port = free_port()
        self.dist_port = free_port()
        self.node = f"kewtest-{secrets.token_hex(4)}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/?retries=60"
        (workdir / "certs").mkdir(exist_ok=True)
        self.certs = make_certs(workdir / "certs")
        self.env = self._configure()

    @property
    def ssl_url(self) -> str:
        return (
            f"amqps://guest:guest@127.0.0.1:{self.ssl_port}/?retries=3&ca_certs={self.certs['ca']}"
        )

    @staticmethod
    def available() -> bool:
        return (BIN / "rabbitmq-server").is_file() and (BIN / "rabbitmqctl").is_file()

    def _configure(self) -> dict[str, str]:
        d = self.dir
        (d / "home").mkdir(exist_ok=True)
        cookie = d / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")  # not the machine's (it names the node)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"listeners.ssl.1 = 127.0.0.1:{self.ssl_port}\n"
            f"ssl_options.cacertfile = {self.certs['ca']}\n"
            f"ssl_options.certfile = {self.certs['cert']}\n"
            f"ssl_options.keyfile = {self.certs['key']}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(d / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(d / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> None:
        log = (self.dir / "rabbitmq-server.out").open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "rabbitmq-server")],
            env=self.env,
            cwd=self.dir,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed as one
        )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited; see {self.dir}")
            return port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.ssl_port)

        wait_for(up, 120, interval=0.2, what="the test RabbitMQ node")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            # the node name is free again once epmd sees the socket closed
            wait_for(lambda: not port_open("127.0.0.1", self.port), 20, what="the node's end")

    def restart(self) -> None:
        self.kill()
        self.start()

    def ctl(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [str(BIN / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)}: {out.stderr or out.stdout}")
        return out.stdout

    def cut_connections(self) -> None:
        """The broker closes every client connection (the node stays up)."""
        t = time.monotonic()
        while True:
            try:
                self.ctl("close_all_connections", "kew test: connections cut")
                return
            except (AssertionError, subprocess.TimeoutExpired):
                if time.monotonic() - t > 60:
                    raise
