"""A Redis Cluster of the tests' own: 3 masters and 3 replicas, real
``redis-server --cluster-enabled yes`` processes on free loopback ports in
a temp dir (no persistence: ``--save "" --appendonly no``), joined with
``redis-cli --cluster create ... --cluster-replicas 1``, stopped by pid.

A node is SIGKILLed with :meth:`RedisCluster.kill` and started again with
:meth:`RedisCluster.start_node` on the same port and nodes.conf: it comes
back empty and joins as a replica of whichever node took its slots.  The
node timeout is 1 s, so a replica takes over about 2 s after its master
dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from kew.testing.util import free_port, port_open, wait_for

NODE_TIMEOUT_MS = 1000


class RedisCluster:
    name = "redis-cluster"
    restart_kills_clients = False

    def __init__(self, workdir: Path, *, masters: int = 3, options: str = "") -> None:
        self.dir = workdir
        self.ports = [free_port() for _ in range(masters * 2)]
        #: The cluster bus of each node (else port + 10000, which may be taken or > 65535).
        self.bus = {port: free_port() for port in self.ports}
        self.masters = masters
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()
        seeds = ",".join(f"127.0.0.1:{p}" for p in self.ports[:masters])
        self.url = f"redis://{seeds}/?lease=1" + (f"&{options}" if options else "")
        #: For the chaos driver: the queue keys whose master restart() fails over.
        self.key_pattern = "kew:{chaos-*"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None

    # -- processes ---------------------------------------------------------

    def start_node(self, port: int) -> None:
        home = self.dir / str(port)
        home.mkdir(exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port)]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", str(home / "nodes.conf")]
        args += ["--cluster-port", str(self.bus[port])]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(home)]
        args += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        log = (home / "redis.log").open("ab")
        self.procs[port] = subprocess.Popen(args, stdout=log, stderr=log)
        wait_for(lambda: port_open("127.0.0.1", port), 20, what=f"redis-server on {port}")

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        create = ["redis-cli", "--cluster", "create"]
        create += [f"127.0.0.1:{p}" for p in self.ports]
        create += ["--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}"
            )
        self.wait_healthy()

    def kill(self, port: int) -> None:
        p = self.procs.get(port)
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for port in self.procs:
            self.resume(port)
            self.kill(port)

    def pause(self, port: int) -> None:
        """SIGSTOP the node (its socket buffers still take what was sent)."""
        os.kill(self.procs[port].pid, signal.SIGSTOP)
        self.paused.add(port)

    def resume(self, port: int) -> None:
        if port in self.paused:
            self.paused.discard(port)
            if self.procs[port].poll() is None:
                os.kill(self.procs[port].pid, signal.SIGCONT)

    def drop_replica_links(self, master: int) -> None:
        """Close the master's links to its replicas (they reconnect within
        a second, unless paused)."""
        r = self.node(master)
        try:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")
        finally:
            r.close()

    # -- what the cluster looks like ---------------------------------------

    def node(self, port: int) -> Any:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def alive(self) -> list[int]:
        """The nodes that run and answer (not killed, not paused)."""
        return [p for p, proc in self.procs.items() if proc.poll() is None and p not in self.paused]

    def nodes(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as one live node sees it: port, flags, master id, slots."""
        for port in self.alive():
            r = self.node(port)
            try:
                text = r.execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            finally:
                r.close()
            # redis-py reads the reply into {"host:port": {"node_id", "flags", ...}}
            return [
                {
                    "id": n["node_id"],
                    "port": int(address.split("@")[0].rsplit(":", 1)[1]),
                    "flags": set(n["flags"].split(",")),
                    "master": n["master_id"],
                    "slots": [(int(s[0]), int(s[-1])) for s in n["slots"]],
                }
                for address, n in text.items()
            ]
        raise RuntimeError("no cluster node answers")

    def master_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot."""
        slot = key_slot(key.encode())
        for n in self.nodes():
            if "master" not in n["flags"] or "fail" in n["flags"]:
                continue
            if any(lo <= slot <= hi for lo, hi in n["slots"]):
                return int(n["port"])
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master: int) -> int:
        nodes = self.nodes()
        mid = next(n["id"] for n in nodes if n["port"] == master)
        return next(int(n["port"]) for n in nodes if n["master"] == mid)

    def is_master(self, port: int) -> bool:
        return any(
            n["port"] == port and "master" in n["flags"] and "fail" not in n["flags"]
            for n in self.nodes()
        )

    def healthy(self) -> bool:
        """Every live node says the cluster is ok; every master that holds
        slots has a replica with its link up, and no node is failing."""
        try:
            for port in self.alive():
                r = self.node(port)
                try:
                    if r.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
                    info = r.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    r.close()
            nodes = self.nodes()
        except (redis.RedisError, RuntimeError):
            return False
        if any(f in n["flags"] for n in nodes for f in ("fail", "fail?", "handshake")):
            return False
        masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
        with_replica = {n["master"] for n in nodes if "slave" in n["flags"]}
        return len(masters) == self.masters and all(m["id"] in with_replica for m in masters)

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_for(self.healthy, timeout, what="the Redis Cluster to be healthy")

    # -- faults --------------------------------------------------------------

    def fail_over(self, port: int) -> tuple[int, float, float]:
        """SIGKILL the master on ``port``; wait for its replica to take over,
        then start the node again (it joins as a replica).  Returns the new
        master's port, the seconds from the kill to the take-over, and the
        time of the kill (``time.monotonic``)."""
        replica = self.replica_of(port)
        killed_at = time.monotonic()
        self.kill(port)
        wait_for(lambda: self.is_master(replica), 30, what=f"{replica} to take over from {port}")
        promoted = time.monotonic() - killed_at
        self.rejoin(port)
        return replica, promoted, killed_at

    def rejoin(self, port: int) -> None:
        """Start a failed-over master again, and wait until it knows it is a
        replica now: until then its nodes.conf may make it answer for its old
        slots (kew may even read the layout from it) and what it takes
        then is lost when it syncs from the new master."""
        self.start_node(port)

        def replica() -> bool:
            r = self.node(port)
            try:
                return bool(r.info("replication")["role"] == "slave")
            except redis.RedisError:
                return False
            finally:
                r.close()

        wait_for(replica, 30, what=f"{port} to rejoin as a replica")

    def restart(self) -> None:
        """For the chaos driver: fail over the master of the chaos queue."""
        port = self._master_holding(self.key_pattern)
        self.fail_over(port)
        self.wait_healthy()

    def _master_holding(self, pattern: str) -> int:
        for n in self.nodes():
            if "master" in n["flags"] and "fail" not in n["flags"]:
                r = self.node(n["port"])
                try:
                    if r.keys(pattern):
                        return int(n["port"])
                finally:
                    r.close()
        return int(next(n["port"] for n in self.nodes() if "master" in n["flags"]))

    def cut_connections(self) -> None:
        for port in self.alive():
            r = self.node(port)
            try:
                r.client_kill_filter(_type="normal", skipme=True)
            except redis.RedisError:
                pass
            finally:
                r.close()
