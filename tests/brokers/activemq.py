"""An ActiveMQ Classic broker of the tests' own (Debian's ``activemq``
package): the project's config (tests/brokers/activemq/activemq.xml), a
persistent KahaDB in a temp dir, the scheduler on, a STOMP connector and a
stomp+ssl connector on free ports; a background java process stopped by
its pid (SIGKILL) and restarted on the same data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from kew.testing.util import free_port, port_open, wait_for
from tests.brokers.stomp_server import listener_pids, probe, who_listens
from tests.brokers.tls import make_certs

HOME = Path("/usr/share/activemq")
CONFIG = Path(__file__).parent / "activemq" / "activemq.xml"
STORE_PASSWORD = "kewtest"


class ActiveMQServer:
    name = "activemq"
    restart_kills_clients = False

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.ssl_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"stomp://127.0.0.1:{self.port}/?dialect=activemq&retries=60"
        self.certs: dict[str, str] = {}
        self.keystore = workdir / "broker.p12"
        #: The broker's config (None: the module's CONFIG, read at launch) and
        #: extra JVM options (after the defaults: a later -Xmx wins);
        #: tests/brokers/activemq_pair.py sets both.
        self.config: Path | None = None
        self.jvm_options: list[str] = []

    @staticmethod
    def available() -> bool:
        return (HOME / "bin" / "activemq.jar").is_file() and shutil.which("java") is not None

    def _make_keystore(self) -> None:
        if self.keystore.exists():
            return
        (self.dir / "certs").mkdir(exist_ok=True)
        self.certs = make_certs(self.dir / "certs")
        subprocess.run(
            ["openssl", "pkcs12", "-export", "-in", self.certs["cert"], "-inkey",
             self.certs["key"], "-name", "broker", "-out", str(self.keystore),
             "-passout", f"pass:{STORE_PASSWORD}"],
            check=True, capture_output=True,
        )  # fmt: skip

    @property
    def ssl_url(self) -> str:
        return (
            f"stomp+ssl://127.0.0.1:{self.ssl_port}/?dialect=activemq&retries=3"
            f"&ca_certs={self.certs['ca']}"
        )

    def start(self) -> None:
        self.launch()
        self.wait_up()

    def launch(self) -> None:
        """Start the java process, without waiting for its ports (a broker
        of a master/slave pair waits for the store's lock first)."""
        self._make_keystore()
        self.data.mkdir(exist_ok=True)
        config = self.config or CONFIG
        args = [
            "java", "-Xms64m", "-Xmx384m", "-XX:+UseSerialGC",
            "-Xshare:auto",
            f"-Dactivemq.home={HOME}", f"-Dactivemq.base={self.dir}",
            f"-Dactivemq.conf={config.parent}", f"-Dactivemq.data={self.data}",
            f"-Dkew.stomp.port={self.port}", f"-Dkew.stomp.ssl.port={self.ssl_port}",
            f"-Dkew.keystore={self.keystore}", f"-Dkew.keystore.password={STORE_PASSWORD}",
            "-Dlog4j2.level=WARN", *self.jvm_options,
            "-jar", str(HOME / "bin" / "activemq.jar"), "start", f"xbean:file:{config}",
        ]  # fmt: skip
        log = (self.dir / "activemq.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def wait_up(self, timeout: float = 120) -> None:
        """Wait until both ports listen, then :meth:`verify` them."""
        proc = self.proc
        assert proc is not None, "launch() first"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ActiveMQ exited; see {self.dir / 'activemq.log'}")
            return port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.ssl_port)

        wait_for(up, timeout, interval=0.2, what="ActiveMQ's STOMP port")
        self.verify()

    def verify(self) -> None:
        """The ports this broker was started on answer STOMP as ActiveMQ (a
        port from free_port() may have been taken by something else)."""
        for port, ca in ((self.port, None), (self.ssl_port, self.certs.get("ca"))):
            deadline = time.monotonic() + 30
            answer = probe("127.0.0.1", port, ca_certs=ca)
            while answer.server is None and time.monotonic() < deadline:
                time.sleep(0.5)  # the connector listens before the broker answers
                answer = probe("127.0.0.1", port, ca_certs=ca)
            pids = listener_pids(port)  # another session's ActiveMQ answers as ActiveMQ too
            mine = self.proc is not None and (not pids or self.proc.pid in pids)
            if not (answer.server or "").startswith("ActiveMQ/") or not mine:
                what = repr(answer.server) if answer.server is not None else answer.problem
                raise AssertionError(
                    f"127.0.0.1:{port} is answered by {what}, not the ActiveMQ started here "
                    f"(pid {self.proc.pid if self.proc else '?'}); listening there: "
                    f"{who_listens(port)}"
                )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cut_connections(self) -> None:
        """Drop every client connection while the broker keeps running: the
        kernel destroys the client ends of the sockets to the STOMP ports
        (``ss -K`` aborts them and resets the broker's end)."""
        for port in (self.port, self.ssl_port):
            subprocess.run(
                ["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)],
                capture_output=True, check=False,
            )  # fmt: skip
