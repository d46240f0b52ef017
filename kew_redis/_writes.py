"""Writes that must be stored: on one server, or on Redis Cluster where
every queue's keys share a slot (the hash tag ``{<queue>}``), and, with
``min_replicas=N``, confirmed by N replicas (``WAIT``) before they count.

* :func:`write` runs the commands ``build(pipe)`` queues, all on one key's
  slot, in one round trip (``MULTI``/``EXEC`` if ``transaction``).
* :func:`write_spread` runs writes to keys of several slots (a Cluster
  settle's sends to other queues): one pipeline, no ``MULTI`` (a
  transaction cannot span slots); redis-py sends each node its share.
* :func:`write_all` runs writes to keys of any slots in one round trip:
  :func:`write` in a ``MULTI`` when they share one, else :func:`write_spread`
  (``send_to``: a task and its status event).
* With ``min_replicas``, each node's share runs on one connection to the
  master that owns the key, followed by ``WAIT N timeout`` on that same
  connection (``WAIT`` counts the replicas that have every write of *its*
  connection; inside ``MULTI`` it would not wait).  Fewer replicas in time
  raise :class:`~kew_redis._client.NotReplicated`: the write is on the
  master, and may be lost if the master dies before a replica has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from redis.commands.core import DataAccessCommands
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, ResponseError

from kew_redis._client import NotReplicated
from kew_redis._options import Options

Build = Callable[[Any], object]


class Recorder(DataAccessCommands):
    """Stands in for a redis-py pipeline: its command methods (``xadd``,
    ``zadd``, ``set``, ...) record the commands' arguments."""

    _event_dispatcher: Any = None  # redis-py's command mixins declare it

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> Recorder:
        self.commands.append(args)
        return self


def is_cluster(r: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(r, RedisCluster)


def write(r: Any, options: Options, key: str, build: Build, *, transaction: bool) -> None:
    """The commands ``build(pipe)`` queues, all on ``key``'s slot, in one
    round trip; with ``min_replicas``, confirmed by that many replicas."""
    if not options.min_replicas:
        with r.pipeline(transaction=transaction) as pipe:
            build(pipe)
            pipe.execute()
        return
    rec = Recorder()
    build(rec)
    with pinned(r, options, key) as session:
        session.run(rec.commands, transaction=transaction)


def write_spread(r: Any, options: Options, writes: Sequence[tuple[str, Build]]) -> None:
    """Writes to keys of any slots, without a transaction (``(key, build)``
    pairs); with ``min_replicas``, each master's share is confirmed."""
    if not writes:
        return
    if not options.min_replicas:
        with r.pipeline(transaction=False) as pipe:
            for _, build in writes:
                build(pipe)
            pipe.execute()
        return
    by_node: dict[str, tuple[str, Recorder]] = {}
    for key, build in writes:
        name = r.get_node_from_key(key).name if is_cluster(r) else ""
        _, rec = by_node.setdefault(name, (key, Recorder()))
        build(rec)
    for key, rec in by_node.values():
        with pinned(r, options, key) as session:
            session.run(rec.commands)


def write_all(r: Any, options: Options, writes: Sequence[tuple[str, Build]]) -> None:
    """Writes to keys of any slots (``(key, build)`` pairs) in one round
    trip: one ``MULTI``/``EXEC`` when the keys share a slot (always on one
    server), else :func:`write_spread` (a transaction cannot span slots)."""
    if not writes:
        return
    if is_cluster(r) and len({key_slot(key.encode()) for key, _ in writes}) > 1:
        write_spread(r, options, writes)
        return

    def build(pipe: Any) -> None:
        for _, one in writes:
            one(pipe)

    write(r, options, writes[0][0], build, transaction=True)


class Session:
    """One connection to the master of a key, for commands whose effect
    ``WAIT`` must confirm."""

    def __init__(self, node: Any, conn: Any, options: Options) -> None:
        self.node = node
        self.conn = conn
        self._options = options

    @property
    def where(self) -> str:
        kw = self.node.connection_pool.connection_kwargs
        return f"{kw.get('host')}:{kw.get('port')}"

    def run(
        self, commands: Sequence[tuple[Any, ...]], *, transaction: bool = False, wait: bool = True
    ) -> Any:
        """Send ``commands`` (in ``MULTI``/``EXEC`` if ``transaction``), then
        ``WAIT`` if ``wait`` and ``min_replicas``; raise the first error
        reply, or :class:`NotReplicated`.  The replies of the commands: the
        ``EXEC`` reply for a transaction (None if a ``WATCH`` failed)."""
        sent = [("MULTI",), *commands, ("EXEC",)] if transaction else list(commands)
        n = self._options.min_replicas if wait else 0
        if n:
            sent.append(("WAIT", n, self._options.replica_timeout_ms))
        conn = self.conn
        conn.send_packed_command(conn.pack_commands(sent))
        replies = [self._read() for _ in sent[: len(sent) - (1 if n else 0)]]
        acked: Any = self._read(self._options.replica_timeout_ms / 1000) if n else 0
        out: Any = replies[-1] if transaction else replies
        errors = [x for x in replies if isinstance(x, ResponseError)]
        if transaction and isinstance(out, list):
            errors += [x for x in out if isinstance(x, ResponseError)]
        if errors:  # a queued error first: EXECABORT only says "previous errors"
            raise errors[0]
        if isinstance(acked, ResponseError):
            raise acked
        if n and int(acked) < n:
            raise NotReplicated.of(self.where, int(acked), n, self._options.replica_timeout_ms)
        return out

    def _read(self, longer: float = 0.0) -> Any:
        timeout = self._options.socket_timeout + longer
        try:
            return self.conn.read_response(timeout=timeout)
        except ResponseError as e:  # the connection stays in step
            return e


@contextlib.contextmanager
def pinned(r: Any, options: Options, key: str) -> Iterator[Session]:
    """A :class:`Session` on a connection to the master that owns ``key``
    (the server itself without Cluster).  After an error the connection is
    closed (its state is unknown); on Cluster, a moved slot or a lost node
    makes the client read the layout again before the caller retries."""
    where = r.get_node_from_key(key) if is_cluster(r) else None
    node = r if where is None else r.get_redis_connection(where)
    pool = node.connection_pool
    try:
        conn = pool.get_connection()
    except BaseException as e:
        _reread_layout(r, where, e)
        raise
    try:
        yield Session(node, conn, options)
    except BaseException as e:
        conn.disconnect()
        _reread_layout(r, where, e)
        raise
    finally:
        pool.release(conn)


def _reread_layout(r: Any, where: Any, e: BaseException) -> None:
    """After a lost node or a moved slot, read the cluster's layout again
    (the failed node asked last), as redis-py does for its own commands."""
    if where is None:
        return
    if isinstance(e, redis.ConnectionError | redis.TimeoutError):
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            r.nodes_manager.initialize(last_failed_node_name=where.name)
    elif isinstance(e, AskError | ClusterDownError):
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            r.nodes_manager.initialize()
