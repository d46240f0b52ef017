"""kew_rabbitmq when the server closes its connections, and long handlers."""

import os
import subprocess
import threading

import pytest

import kew
from kew.testing.util import port_open, require, wait_for


def _close_connections(name: str) -> int:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split()[0] for line in out.splitlines() if name in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "kew reconnect test"],
            capture_output=True,
            check=True,
        )
    return len(pids)


@pytest.fixture
def url() -> str:
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not reachable on 127.0.0.1:5672")
    require(
        subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode == 0,
        "rabbitmqctl cannot reach the local node",
    )
    return f"amqp://guest:guest@127.0.0.1/?connection_name=kew-test-{os.urandom(4).hex()}"


def test_server_side_close_loses_nothing_and_consumption_resumes(url: str) -> None:
    name = url.rsplit("=", 1)[1]
    conn = kew.connect(url)
    q = kew.Queue(conn, f"reconnect-{name}", int)
    got: set[int] = set()
    confirmed: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            try:
                q.send(i)
            except kew.KewError:
                continue  # not confirmed: send again
            confirmed.append(i)
            i += 1

    try:
        with q.sink(got.add, concurrency=2):
            t = threading.Thread(target=produce)
            t.start()
            wait_for(lambda: len(got) >= 100, 30, what="consumption before the cut")
            assert _close_connections(name) >= 2  # the producer's and the consumer's
            n = len(confirmed)  # rabbitmqctl is slow: some were sent after the cut already
            wait_for(lambda: len(confirmed) >= n + 100, 60, what="sends after the cut")
            m = len(confirmed)
            wait_for(lambda: set(confirmed[:m]) <= got, 60, what="consumption after the cut")
            stop.set()
            t.join(30)
            wait_for(lambda: set(confirmed) <= got, 60, what="every confirmed message")
    finally:
        stop.set()  # (on a failure too: the producer thread must not spin on)
        conn.delete(f"reconnect-{name}")
        conn.close()
    assert not set(confirmed) - got


def test_long_handler_keeps_its_connection(url: str) -> None:
    url = url + "&heartbeat=1"
    conn = kew.connect(url)
    qname = f"heartbeat-{os.urandom(3).hex()}"
    q = kew.Queue(conn, qname, str)
    done = threading.Event()
    release = threading.Event()

    def slow(_: str) -> None:
        release.wait(10)  # > 2 heartbeat intervals, without touching the connection
        done.set()

    try:
        q.send("long")
        sub = q.sink(slow)
        consumer = sub._consumer
        threading.Timer(3.5, release.set).start()
        assert done.wait(20)
        wait_for(lambda: q.browser().stats().ready == 0, 10, what="the ack")
        assert consumer.reconnects == 0  # type: ignore[attr-defined]
        sub.stop()
    finally:
        conn.delete(qname)
        conn.close()
