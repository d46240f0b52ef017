"""kew_artemis when its ActiveMQ dies: SIGKILL mid-run, start again on the
same data; nothing acknowledged is lost and consumption resumes by itself.
Also the failover list, heartbeats under a long handler, and a clear error
for an unreachable broker."""

import os
import threading
import time

import pytest

import kew
from kew.testing.util import free_port, wait_for
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp


def test_broker_killed_and_restarted_loses_nothing_acknowledged(activemq: ActiveMQServer) -> None:
    conn = kew.connect(activemq.url)
    name = f"restart-{os.urandom(3).hex()}"
    q = kew.Queue(conn, name, int)
    got: set[int] = set()
    acknowledged: list[int] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            try:
                if i % 2:
                    q.send(i)
                    acknowledged.append(i)
                    i += 1
                else:
                    batch = list(range(i, i + 20))
                    q.send_many(batch)
                    acknowledged.extend(batch)
                    i += 20
            except kew.KewError:
                continue  # not receipted: send again

    try:
        with q.sink(got.add, concurrency=2):
            t = threading.Thread(target=produce)
            t.start()
            wait_for(lambda: len(got) >= 100, 30, what="consumption before the kill")
            activemq.restart()  # SIGKILL, then start on the same KahaDB
            n = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= n + 100, 90, what="sends after the restart")
            m = len(got)
            wait_for(lambda: len(got) >= m + 100, 60, what="consumption after the restart")
            stop.set()
            t.join(60)
            wait_for(lambda: set(acknowledged) <= got, 90, what="every acknowledged message")
    finally:
        stop.set()
        conn.delete(name)
        conn.close()
    assert not set(acknowledged) - got


def test_failover_list_skips_a_dead_host(activemq: ActiveMQServer) -> None:
    dead = free_port()
    url = f"stomp://127.0.0.1:{dead},127.0.0.1:{activemq.port}/?dialect=activemq&retries=1"
    conn = kew.connect(url)
    q = kew.Queue(conn, f"failover-{os.urandom(3).hex()}", str)
    try:
        q.send("via the second host")
        got: list[str] = []
        with q.sink(got.append):
            wait_for(lambda: got, 10, what="the message")
        assert got == ["via the second host"]
    finally:
        conn.delete(q.name)
        conn.close()


def test_long_handler_keeps_its_connection(activemq: ActiveMQServer) -> None:
    """Heartbeats both ways (1 s) while a handler runs for 4 s: the
    connection stays, so the message is acked once, not redelivered."""
    conn = kew.connect(activemq.url + "&heartbeat=1000")
    q = kew.Queue(conn, f"heartbeat-{os.urandom(3).hex()}", str)
    calls: list[int] = []
    done = threading.Event()
    try:
        q.send("slow")

        def slow(_: str) -> None:
            calls.append(1)
            time.sleep(4)  # the long handler under test
            done.set()

        sub = q.sink(slow)
        try:
            assert done.wait(20), "the handler never finished"
        finally:
            sub.stop(grace=5)  # a redelivery held now would go back to the queue
        assert calls == [1]
        assert q.browser().stats().ready == 0
    finally:
        conn.delete(q.name)
        conn.close()


def test_unreachable_broker_is_a_clear_error() -> None:
    port = free_port()
    conn = kew.connect(f"stomp://127.0.0.1:{port}/?retries=1")
    with pytest.raises(kew.BrokerUnavailable, match=rf"unreachable: 127\.0\.0\.1:{port}: "):
        kew.Queue(conn, "nowhere", str).declare()


def test_wrong_login_is_refused_clearly_without_the_password() -> None:
    require_rabbitmq_stomp()  # another STOMP server on 61613 may take any password
    conn = kew.connect("stomp://guest:n0t-the-pw@127.0.0.1:61613/?dialect=rabbitmq&retries=5")
    with pytest.raises(kew.BrokerUnavailable, match="refused the connection") as e:
        kew.Queue(conn, "nowhere", str).declare()
    assert "Access refused" in str(e.value)
    assert "n0t-the-pw" not in str(e.value) and "n0t-the-pw" not in repr(conn)
