"""kew_redis against a redis-server of the tests' own (crash, restart, a Unix
socket) and the machine's (fork, options)."""

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kew
from kew.qchan.spi import QueueStats
from kew.testing.util import port_open, require, wait_for
from kew_redis import RedisConnector
from tests.brokers.redis import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require(RedisServer.available(), "redis-server is not installed")
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.kill()


def test_acknowledged_sends_survive_a_broker_sigkill(server: RedisServer) -> None:
    q = kew.Queue(kew.connect(server.url), "crash", int)
    acked: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            try:
                q.send_many(range(i, i + 20))
            except kew.KewError:
                continue  # the broker is down: send the batch again
            acked.extend(range(i, i + 20))
            i += 20

    t = threading.Thread(target=produce)
    t.start()
    wait_for(lambda: len(acked) >= 400, 30, what="sends before the crash")
    server.restart()  # SIGKILL mid-stream, then up again on the same AOF
    wait_for(lambda: len(acked) >= 1000, 60, what="sends after the crash")
    stop.set()
    t.join(30)
    got: list[int] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        with lock:
            got.append(i)

    consumer_q = kew.Queue(kew.connect(server.url), "crash", int)
    with consumer_q.sink(take, concurrency=2), consumer_q.sink(take, concurrency=2):
        wait_for(lambda: set(acked) <= set(got), 60, what="every acknowledged send")
    assert not set(acked) - set(got)  # nothing acknowledged was lost
    # a pipeline cut by the kill may be sent again whole: at most one batch
    dup = len(got) - len(set(got))
    assert dup <= 20, f"{dup} duplicates from one broker restart"


def test_consumer_resumes_after_broker_restart(server: RedisServer) -> None:
    q = kew.Queue(kew.connect(server.url), "resume", str)
    got: list[str] = []
    with q.sink(got.append):
        q.send("before")
        wait_for(lambda: got == ["before"], 10, what="the first message")
        server.restart()
        q.send("after")
        wait_for(lambda: got == ["before", "after"], 30, what="consumption to resume")


def test_unreachable_broker_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    from kew.testing.util import free_port

    c = kew.connect(f"redis://:hunter2@127.0.0.1:{free_port()}/0?retries=1&socket_timeout=0.5")
    with pytest.raises(kew.BrokerUnavailable) as e:
        kew.Queue(c, "q", int).declare()  # the first operation connects
    assert "is unreachable" in str(e.value) and "hunter2" not in str(e.value)
    assert "hunter2" not in repr(c)


def test_bad_redis_urls() -> None:
    with pytest.raises(kew.ConfigError, match="database number"):
        kew.connect("redis://127.0.0.1/zero")
    with pytest.raises(kew.ConfigError, match="need a rediss:// URL"):
        kew.connect("redis://127.0.0.1/0?ssl_ca_certs=/x.pem")
    with pytest.raises(kew.ConfigError, match="unknown option"):
        kew.connect("redis://127.0.0.1/0?leese=3")


# -- fork safety ---------------------------------------------------------------------


def _machine_url(prefix: str) -> str:
    require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
    return f"redis://127.0.0.1:6379/15?lease=1&prefix={prefix}"


def _round_trip(q: kew.Queue[str], text: str) -> None:
    got: list[str] = []
    with q.sink(got.append):
        q.send(text)
        wait_for(lambda: got == [text], 10, what=f"{text!r} consumed")


def _in_child(c: RedisConnector, parent_client: object, queue: str) -> None:
    """What a child does with its parent's connector: its own message, sent
    and consumed on connections of its own (exits non-zero on failure)."""
    try:
        _round_trip(kew.Queue(c, queue, str), f"from child {os.getpid()}")
        assert c.redis is not parent_client  # made again in this process
        assert c.redis.connection_pool.pid == os.getpid()
    except BaseException as e:
        print(f"child failed: {e!r}", flush=True)
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_connector_works_in_a_forked_child_and_still_in_the_parent(how: str) -> None:
    prefix = f"fork-{os.urandom(4).hex()}"
    c = kew.connect(_machine_url(prefix))
    assert isinstance(c, RedisConnector)
    q = kew.Queue(c, "parent", str)
    try:
        _round_trip(q, "before the fork")
        parent_client = c.redis
        got: list[str] = []
        with q.sink(got.append):  # the parent's consumer runs across the fork
            q.send("during")
            wait_for(lambda: got == ["during"], 10, what="the parent's message")
            code: int | None
            if how == "os.fork":
                pid = os.fork()
                if pid == 0:
                    _in_child(c, parent_client, "child")
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                ctx = multiprocessing.get_context("fork")
                p = ctx.Process(target=_in_child, args=(c, parent_client, "child"))
                p.start()
                p.join(60)
                code = p.exitcode
            assert code == 0, f"the child exited with {code}"
            q.send("after")
            wait_for(lambda: got == ["during", "after"], 10, what="the parent, after the fork")
        assert c.redis is parent_client  # the parent kept its own
        _round_trip(q, "after the fork")
        assert kew.Queue(c, "child", str).browser().stats() == QueueStats(0, 0, 0, 0)
    finally:
        c.delete("parent")
        c.delete("child")
        c.close()


# -- URL options ---------------------------------------------------------------------


def _client_names(r: Any) -> list[str]:
    return [str(c.get("name", "")) for c in r.client_list()]


def test_redis_py_connection_options_are_passed_on() -> None:
    name = f"kew-options-{os.urandom(3).hex()}"
    url = _machine_url("opts") + (
        f"&db=15&client_name={name}&health_check_interval=1&socket_keepalive=true"
        "&socket_connect_timeout=1&socket_timeout=5"
    )
    c = kew.connect(url)
    try:
        assert isinstance(c, RedisConnector)
        kwargs = c.redis.connection_pool.connection_kwargs
        assert kwargs["client_name"] == name and kwargs["health_check_interval"] == 1
        assert kwargs["socket_keepalive"] is True and kwargs["socket_connect_timeout"] == 1.0
        assert kwargs["socket_timeout"] == 5.0 and kwargs["db"] == 15
        _round_trip(kew.Queue(c, "opts", str), "with options")
        assert name in _client_names(c.redis)  # CLIENT SETNAME on connect
    finally:
        c.delete("opts")
        c.close()


@pytest.fixture
def unix_server() -> Iterator[Path]:
    """A redis-server of the test's own on a Unix socket only, with a
    password (a short directory: socket paths are limited to ~100 bytes)."""
    require(RedisServer.available(), "redis-server is not installed")
    directory = Path(tempfile.mkdtemp(prefix="kew-redis-"))
    path = directory / "redis.sock"
    log = (directory / "redis.log").open("ab")
    args = ["--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"]
    args += ["--save", "", "--dir", str(directory), "--requirepass", "sockpw"]
    proc = subprocess.Popen(["redis-server", *args], stdout=log, stderr=log)
    try:

        def answers() -> bool:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return True
            return False

        wait_for(answers, 20, what="redis-server on its Unix socket")
        yield path
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_unix_socket_url(unix_server: Path) -> None:
    url = f"unix://{unix_server}?db=2&password=sockpw&prefix=sock&client_name=kew-unix"
    c = kew.connect(url)
    try:
        assert isinstance(c, RedisConnector)
        assert "sockpw" not in repr(c) and "password=***" in c.url
        assert c.options.path == str(unix_server) and c.options.db == 2
        q = kew.Queue(c, "over-a-socket", str)
        _round_trip(q, "over a Unix socket")
        assert "kew-unix" in _client_names(c.redis)
        assert (
            c.redis.exists("sock:{over-a-socket}") == 1
            and c.redis.connection_pool.connection_kwargs["db"] == 2
        )
        # the password before the @, as for redis://; a wrong one is refused
        again = kew.connect(f"unix://:sockpw@{unix_server}?db=2&prefix=sock")
        assert kew.Queue(again, "over-a-socket", str).browser().stats().ready == 0
        with pytest.raises(kew.AccessRefused):
            kew.Queue(kew.connect(f"unix://:wrong@{unix_server}"), "q", str).declare()
        with pytest.raises(kew.BrokerUnavailable, match="No such file"):
            kew.Queue(kew.connect(f"unix://{unix_server}.gone?retries=0"), "q", str).declare()
    finally:
        c.delete("over-a-socket")
        c.close()
