"""Two ActiveMQ Classic brokers of the tests' own in a shared-file-system
master/slave pair: two java processes (each an
:class:`~tests.brokers.activemq.ActiveMQServer`, on free loopback ports)
over one KahaDB directory.

The first to take the store's file lock (``kahadb/lock``, a POSIX lock) is
the master; the other waits for the lock, polling it every
``lock_interval_ms``, and starts its transport connectors only once it has
it, so a client's failover list (``stomp://h1:p1,h2:p2/``) finds one port
that answers.  SIGKILLing the master frees its lock (the kernel drops it
with the process): the slave takes it, recovers the store (every
receipted message, and every delivery not acked) and opens its ports.  A
killed broker started again waits as the new slave.

The config is the tests' one (tests/brokers/activemq/activemq.xml, read at
start) with a ``shared-file-locker`` in its ``kahaDB``, and log4j set so
that the log says when a broker waits as the slave.  With
``persist_redelivered`` the queues' policy has ``persistJMSRedelivered``:
the store notes a message as redelivered before it is dispatched, so a
delivery unsettled at a failover comes back from the new master marked
redelivered (a store write per dispatch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from kew.testing.util import port_open, wait_for
from tests.brokers import activemq
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import listener_pids

#: What a broker's log says when it finds the store locked (SharedFileLocker, INFO).
SLAVE_LINE = b"This broker is now in slave mode"
_LOG4J = """\
log4j.rootLogger=WARN, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=%d{HH:mm:ss,SSS} %-5p %c{1} - %m%n
log4j.logger.org.apache.activemq.store.SharedFileLocker=INFO
log4j.logger.org.apache.activemq.broker.BrokerService=INFO
"""
_KAHADB = 'journalDiskSyncStrategy="always"/>'
_POLICY = 'gcInactiveDestinations="true"'


class ActiveMQPair:
    """Brokers 0 and 1 over one store; :meth:`which` says which is master."""

    name = "activemq-pair"
    #: for tests/chaos/driver.py: a failover keeps the client processes
    restart_kills_clients = False

    def __init__(
        self, workdir: Path, lock_interval_ms: int = 250, persist_redelivered: bool = False
    ) -> None:
        self.dir = workdir
        self.data = workdir / "shared-data"
        self.config = workdir / "activemq-pair.xml"
        self.lock_interval_ms = lock_interval_ms
        self.persist_redelivered = persist_redelivered
        self.brokers = [self._broker(workdir / name) for name in ("a", "b")]
        hosts = ",".join(f"127.0.0.1:{b.port}" for b in self.brokers)
        self.url = f"stomp://{hosts}/?dialect=activemq&retries=60"
        #: seconds from launching the first broker to a master that answers
        #: and a slave that waits for the lock
        self.up_s: float | None = None
        #: seconds from each SIGKILL of the master to the slave's port answering
        self.takeovers: list[float] = []
        #: seconds for a killed broker started again to wait as the slave
        self.rejoins: list[float] = []
        self._log_from = [0, 0]  # where each broker's log starts for its current process

    def _broker(self, workdir: Path) -> ActiveMQServer:
        workdir.mkdir(exist_ok=True)
        b = ActiveMQServer(workdir)
        b.data = self.data  # the shared store
        b.config = self.config
        b.jvm_options = [
            "-Xms32m", "-Xmx256m", "-XX:TieredStopAtLevel=1",  # a quicker JVM start
            f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
        ]  # fmt: skip
        return b

    @staticmethod
    def available() -> bool:
        return ActiveMQServer.available()

    def _write_config(self) -> None:
        shared = activemq.CONFIG.read_text()
        for part in (_KAHADB, _POLICY):
            if shared.count(part) != 1:
                raise AssertionError(f"{activemq.CONFIG} does not hold {part} once")
        if self.persist_redelivered:
            shared = shared.replace(_POLICY, f'{_POLICY} persistJMSRedelivered="true"')
        interval = self.lock_interval_ms
        locker = (
            'journalDiskSyncStrategy="always">\n        <locker>'
            f'<shared-file-locker lockAcquireSleepInterval="{interval}"/></locker>\n      </kahaDB>'
        )
        self.config.write_text(shared.replace(_KAHADB, locker))
        (self.dir / "log4j.properties").write_text(_LOG4J)
        self.data.mkdir(exist_ok=True)

    # -- starting and stopping --------------------------------------------------

    def start(self) -> None:
        """Broker 0 as master (it takes the lock first), then broker 1 as slave."""
        self._write_config()
        started = time.monotonic()
        self._launch(0)
        self._wait(lambda: self.which() == 0, 60, "broker 0 to take the lock")
        self._launch(1)
        self.brokers[0].wait_up(60)
        self.wait_slave(1)
        self.up_s = time.monotonic() - started

    def stop(self) -> None:
        """SIGKILL both (by pid); safe to call at any time."""
        for b in self.brokers:
            b.kill()

    def _launch(self, i: int) -> None:
        log = self.brokers[i].dir / "activemq.log"
        self._log_from[i] = log.stat().st_size if log.exists() else 0
        self.brokers[i].launch()

    def _log(self, i: int) -> bytes:
        """Broker ``i``'s log since its current process started."""
        log = self.brokers[i].dir / "activemq.log"
        if not log.exists():
            return b""
        with log.open("rb") as f:
            f.seek(self._log_from[i])
            return f.read()

    def state(self) -> str:
        """Each broker's pid, whether it runs, and its log's last lines."""
        out = [f"master (lock holder): {self.which()}"]
        for i, b in enumerate(self.brokers):
            pid = b.proc.pid if b.proc else None
            tail = b"\n    ".join(self._log(i).splitlines()[-4:]).decode(errors="replace")
            out.append(f"broker {i} pid {pid} alive={self.alive(i)} port {b.port}:\n    {tail}")
        return "\n".join(out)

    def _wait(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_for(condition, timeout, interval=0.02, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.state()}") from None

    # -- who is master ------------------------------------------------------------

    def alive(self, i: int) -> bool:
        proc = self.brokers[i].proc
        return proc is not None and proc.poll() is None

    def which(self) -> int | None:
        """The broker holding the store's lock (the master; its ports may
        not answer yet), or None while none does."""
        pids = {b.proc.pid: i for i, b in enumerate(self.brokers) if b.proc and self.alive(i)}
        try:
            inode = os.stat(self.data / "kahadb" / "lock").st_ino
            locks = Path("/proc/locks").read_text()
        except FileNotFoundError:  # no lock file yet (or no /proc/locks: ask who listens)
            return next((i for i, b in enumerate(self.brokers) if self._listens(i)), None)
        for line in locks.splitlines():
            fields = line.split()
            if "->" in fields or len(fields) < 6:
                continue  # a process waiting for a lock, not holding it
            pid, where = int(fields[4]), fields[5]
            if pid in pids and where.rsplit(":", 1)[-1] == str(inode):
                return pids[pid]
        return None

    def _listens(self, i: int) -> bool:
        b = self.brokers[i]
        return b.proc is not None and b.proc.pid in listener_pids(b.port)

    @property
    def master(self) -> ActiveMQServer:
        i = self.which()
        if i is None:
            raise AssertionError("no broker of the pair holds the store's lock")
        return self.brokers[i]

    def is_slave(self, i: int) -> bool:
        """Broker ``i`` runs, said it waits for the lock, and has not got it."""
        return self.alive(i) and SLAVE_LINE in self._log(i) and self.which() != i

    def wait_master(self, i: int, timeout: float = 60) -> float:
        """Until broker ``i`` holds the lock and answers STOMP on its ports;
        when its STOMP port opened (time.monotonic())."""
        b = self.brokers[i]

        def up() -> bool:
            if not self.alive(i):
                raise AssertionError(f"broker {i} exited\n{self.state()}")
            return self.which() == i and port_open("127.0.0.1", b.port, 0.2)

        self._wait(up, timeout, f"broker {i} as master, its STOMP port open")
        opened = time.monotonic()
        b.wait_up(timeout)  # both ports, and verify(): it is the ActiveMQ started here
        return opened

    def wait_slave(self, i: int, timeout: float = 60) -> None:
        def waiting() -> bool:
            if not self.alive(i):
                raise AssertionError(f"broker {i} exited\n{self.state()}")
            return self.is_slave(i)

        self._wait(waiting, timeout, f"broker {i} waiting as the slave")

    # -- failing over ---------------------------------------------------------------

    def kill_master(self) -> tuple[int, float]:
        """SIGKILL the master; (which one it was, when: time.monotonic())."""
        i = self.which()
        if i is None:
            raise AssertionError("no master to kill")
        self.brokers[i].kill()
        return i, time.monotonic()

    def take_over(self, killed: int, at: float, timeout: float = 60) -> float:
        """Wait for the slave to answer as master; seconds since ``at`` (the kill)."""
        took = self.wait_master(1 - killed, timeout) - at
        self.takeovers.append(took)
        return took

    def rejoin(self, i: int) -> float:
        """Start killed broker ``i`` again: it waits as the new slave."""
        if self.alive(i):
            raise AssertionError(f"broker {i} is running")
        started = time.monotonic()
        self._launch(i)
        self.wait_slave(i)
        took = time.monotonic() - started
        self.rejoins.append(took)
        return took

    def fail_over(self) -> float:
        """Kill the master, wait for the slave to take over, start the
        killed one again as the slave; the takeover's seconds."""
        killed, at = self.kill_master()
        took = self.take_over(killed, at)
        self.rejoin(killed)
        return took

    def heal(self) -> None:
        """Start again whichever broker is not running (after a test that
        failed mid-failover): one master that answers, one slave."""
        dead = [i for i in (0, 1) if not self.alive(i)]
        for i in dead:
            self._launch(i)
        if dead:
            self._wait(lambda: self.which() is not None, 60, "a master")
            master = self.which()
            assert master is not None
            self.wait_master(master)
            self.wait_slave(1 - master)

    # -- for tests/chaos/driver.py ---------------------------------------------------

    def restart(self) -> None:
        """The chaos driver's broker restart: a failover."""
        self.fail_over()

    def cut_connections(self) -> None:
        self.master.cut_connections()
