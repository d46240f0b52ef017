"""A RabbitMQ cluster of the tests' own: three nodes on this machine, each
a :class:`~tests.brokers.rabbitmq.RabbitMQServer` (its own ``kewtest-``
node name, free loopback AMQP and distribution ports, Mnesia and log dirs
and an ``enabled_plugins`` file with no plugin, in a temp dir), given one
Erlang cookie of the cluster's own (written to each node's own ``HOME``;
the machine's cookie is never read or written) and joined to the first
with ``rabbitmqctl stop_app / join_cluster / start_app``.

A node is SIGKILLed with :meth:`RabbitMQCluster.kill` and started again
on its data with :meth:`RabbitMQCluster.start_node`: it rejoins by itself
(its Mnesia dir knows the cluster); :meth:`RabbitMQCluster.pause` makes
one hang (SIGSTOP) until :meth:`RabbitMQCluster.resume`.  :meth:`RabbitMQCluster.stop` kills
every node by its process group.  Nothing here talks to the machine's own
node (``rabbit@<hostname>`` on 5672): every ``rabbitmqctl`` names a test
node (``-n``) and runs with the test node's ``HOME`` (its cookie).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kew.testing.util import wait_for
from tests.brokers.rabbitmq import RabbitMQServer


class RabbitMQCluster:
    name = "rabbitmq-cluster"
    restart_kills_clients = False

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.dir = workdir
        self.members: list[RabbitMQServer] = []
        cookie = secrets.token_hex(16).upper()
        for i in range(size):
            (workdir / f"n{i + 1}").mkdir(exist_ok=True)
            member = RabbitMQServer(workdir / f"n{i + 1}")
            path = member.dir / "home" / ".erlang.cookie"  # the node's own HOME
            path.chmod(0o600)
            path.write_text(cookie)
            path.chmod(0o400)
            self.members.append(member)
        #: Every node, the first one first (kew tries them in order).
        self.url = self.url_from(0)
        #: Seconds start() took to have every node running in one cluster.
        self.up_seconds = 0.0

    @staticmethod
    def available() -> bool:
        return RabbitMQServer.available()

    @property
    def nodes(self) -> list[str]:
        """The Erlang node names, ``kewtest-...@localhost``."""
        return [m.node for m in self.members]

    def url_from(self, i: int, options: str = "retries=20") -> str:
        """A URL listing every node, node ``i`` first (then the others in
        turn): kew connects to the first that answers."""
        order = self.members[i:] + self.members[:i]
        hosts = ",".join(f"127.0.0.1:{m.port}" for m in order)
        return f"amqp://guest:guest@{hosts}/?{options}"

    def member(self, node: str) -> RabbitMQServer:
        return next(m for m in self.members if m.node == node)

    # -- processes ---------------------------------------------------------

    def start(self) -> None:
        """Start every node at once, join the others to the first, wait until
        the first sees them all running.  On any failure every node started
        is killed before the error goes on."""
        started = time.monotonic()
        try:
            _in_parallel([m.start for m in self.members])
            first, others = self.members[0], self.members[1:]
            # each rabbitmqctl boots an Erlang VM (0.5 to 2 s here): what
            # may run at once does; the joins go one at a time
            _in_parallel([partial(m.ctl, "stop_app") for m in others])
            for m in others:
                m.ctl("join_cluster", first.node)
            _in_parallel([partial(m.ctl, "start_app") for m in others])
            self.wait_running(self.nodes)
        except BaseException:
            self.stop()
            raise
        self.up_seconds = time.monotonic() - started

    def stop(self) -> None:
        """SIGKILL every node (its process group), whatever state it is in
        (paused too)."""
        for m in self.members:
            m.kill()

    def alive(self) -> list[RabbitMQServer]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    def kill(self, node: str) -> float:
        """SIGKILL ``node``; returns when (``time.monotonic``) it was killed."""
        m = self.member(node)
        assert m.proc is not None and m.proc.poll() is None, f"{node} is not running"
        at = time.monotonic()
        m.kill()
        return at

    def start_node(self, node: str) -> None:
        """Start a killed node again on its data: it rejoins the cluster."""
        self.member(node).start()
        self.wait_running(self.nodes)

    def pause(self, node: str) -> None:
        """SIGSTOP ``node`` (its process group): its ports still take TCP
        connections (the kernel's backlog) but nothing answers."""
        m = self.member(node)
        assert m.proc is not None
        os.killpg(m.proc.pid, signal.SIGSTOP)

    def resume(self, node: str) -> None:
        m = self.member(node)
        assert m.proc is not None
        os.killpg(m.proc.pid, signal.SIGCONT)

    # -- what the cluster looks like ---------------------------------------

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` on the first live node."""
        error: Exception | None = None
        for m in self.alive():
            try:
                return m.ctl(*args, timeout=timeout)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                error = e
        raise AssertionError(f"no test node answers rabbitmqctl {' '.join(args)}: {error}")

    def status(self) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as a live node tells: running_nodes,
        listeners (per node), alarms, partitions ..."""
        status: dict[str, Any] = json.loads(
            self.ctl("cluster_status", "--formatter", "json", timeout=20)
        )
        return status

    def running(self) -> set[str]:
        """The nodes the cluster sees running."""
        try:
            return set(self.status().get("running_nodes", []))
        except (AssertionError, ValueError):
            return set()

    def wait_running(self, nodes: list[str], timeout: float = 60) -> None:
        wait_for(
            lambda: set(nodes) <= self.running(), timeout, interval=0.2, what=f"{nodes} running"
        )

    def queues(self) -> dict[str, dict[str, str]]:
        """Every queue with its type, leader and online members."""
        out = self.ctl(
            "list_queues", "name", "type", "leader", "online", "--formatter", "json", timeout=20
        )
        return {q["name"]: q for q in json.loads(out)}

    def counts(self, queue: str) -> tuple[int, int]:
        """The broker's count of ``queue``'s messages ready and delivered
        but not acknowledged."""
        out = self.ctl(
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter",
            "json",
            timeout=20,
        )
        q = next(q for q in json.loads(out) if q["name"] == queue)
        return int(q["messages_ready"]), int(q["messages_unacknowledged"])

    def leader_of(self, queue: str) -> str:
        """The node that leads the quorum queue ``queue``."""
        q = self.queues().get(queue)
        assert q is not None, f"no queue {queue!r} on the cluster"
        assert q["type"] == "quorum", f"{queue!r} is a {q['type']} queue: no leader"
        leader = q["leader"]
        assert leader in self.nodes, f"{queue!r} has no leader now ({leader!r})"
        return str(leader)

    # -- faults --------------------------------------------------------------

    def new_leader(self, queue: str, old: str, timeout: float = 60) -> str:
        """Wait until a node other than ``old`` leads ``queue``; that node."""

        def other() -> str | None:
            try:
                leader = self.leader_of(queue)
            except AssertionError:  # no leader for now
                return None
            return leader if leader != old else None

        leader = wait_for(other, timeout, interval=0.1, what=f"a new leader of {queue}")
        assert leader is not None  # wait_for returns only a truthy value
        return leader

    def fail_over(self, queue: str) -> tuple[str, str, float, float]:
        """SIGKILL the leader of ``queue``, wait until another node leads it,
        start the killed node again.  Returns the killed node, the new
        leader, the seconds from the kill until ``rabbitmqctl`` showed the
        new leader (an upper bound: each call takes 0.5 to 2 s) and when the
        kill was (``time.monotonic``)."""
        old = self.leader_of(queue)
        killed_at = self.kill(old)
        leader = self.new_leader(queue, old)
        elected = time.monotonic() - killed_at
        self.start_node(old)
        return old, leader, elected, killed_at

    def cut_connections(self) -> None:
        """Every live node closes its client connections (at once)."""
        _in_parallel([m.cut_connections for m in self.alive()])


def _in_parallel(calls: list[Callable[[], object]]) -> None:
    """Run the calls in threads; the first error goes on once all ended."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
