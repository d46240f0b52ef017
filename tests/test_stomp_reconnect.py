"""kew_artemis's connections: its ActiveMQ SIGKILLed mid-run and started
again on the same data (nothing acknowledged is lost, consumption resumes
by itself); the failover list; heartbeats under a long handler; a clear
error for an unreachable broker (tests/test_stomp_errors.py has the rest);
stomp.py's connection options passed on; a connector across os.fork; a
RabbitMQ delay queue outliving its first declare."""

import multiprocessing
import os
import socket
import threading
import time
from typing import cast

import pytest

import kew
from kew.qchan.spi import ConsumerFailed, Message, now_ms
from kew.qchan.spi.kit import DELAY_EXPIRES
from kew.testing.util import free_port, wait_for
from kew_artemis.provider import StompConnector, StompConsumer, StompProducer
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.stomp_server import require_rabbitmq_stomp

RABBIT = "stomp://guest:guest@127.0.0.1:61613/?dialect=rabbitmq"


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


# -- stomp.py's connection options ----------------------------------------------------


def test_stomp_py_connection_options_are_passed_on() -> None:
    require_rabbitmq_stomp()
    options = (
        "&heartbeats=2000,3000&heart_beat_receive_scale=3&keepalive=false"
        "&bind_host_port=127.0.0.2:0&connect_timeout=5"  # another loopback address
    )
    c = kew.connect(RABBIT + options)
    q = kew.Queue(c, f"options-{os.urandom(3).hex()}", str)
    try:
        _round_trip(q, "with stomp.py's options")
        assert isinstance(c, StompConnector)
        conn = c.link().conn
        assert conn.heartbeats == (2000, 3000)  # as negotiated with RabbitMQ
        assert conn.send_sleep == 2.0 and conn.receive_sleep == 9.0  # 3 s x 3
        sock = conn.transport.socket
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockname()[0] == "127.0.0.2"
    finally:
        c.delete(q.name)
        c.close()
    default = kew.connect(RABBIT)
    try:
        assert isinstance(default, StompConnector)
        conn = default.link().conn
        assert conn.heartbeats == (10000, 10000) and conn.receive_sleep == 20.0
        sock = conn.transport.socket
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        default.close()


# -- fork safety ---------------------------------------------------------------------


def _round_trip(q: kew.Queue[str], text: str) -> None:
    got: list[str] = []
    with q.sink(got.append):
        q.send(text)
        wait_for(lambda: got == [text], 20, what=f"{text!r} consumed")


def _in_child(
    c: StompConnector, parent: kew.Queue[str], child_queue: str, consumer: StompConsumer
) -> None:
    """What a child does with its parent's connector and queue: a round
    trip of its own, and a send through the parent's queue object (whose
    producer the parent made), on connections of its own; the parent's
    consumer says it stayed in the parent (exits non-zero on failure)."""
    try:
        inherited = c._link
        assert inherited is not None and not inherited.usable()  # dropped at the fork
        with pytest.raises(ConsumerFailed, match=r"does not cross os\.fork"):
            consumer.fetch(1, 0.1)
        _round_trip(kew.Queue(c, child_queue, str), f"from child {os.getpid()}")
        parent.send(f"sent by child {os.getpid()}")
        link = c.link()
        assert link is not inherited and link.pid == os.getpid()
        producer = cast(StompProducer, parent.producer)
        assert producer._link is not None and producer._link.pid == os.getpid()
    except BaseException as e:
        print(f"child failed: {e!r}", flush=True)
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_connector_works_in_a_forked_child_and_still_in_the_parent(how: str) -> None:
    require_rabbitmq_stomp()
    c = kew.connect(RABBIT)
    assert isinstance(c, StompConnector)
    name = f"fork-{os.urandom(3).hex()}"
    q = kew.Queue(c, name, str)
    try:
        _round_trip(q, "before the fork")
        parent_link = c.link()
        producer = cast(StompProducer, q.producer)
        parent_producer_link = producer._link
        got: list[str] = []
        with q.sink(got.append) as sub:  # the parent's consumer runs across the fork
            q.send("during")
            wait_for(lambda: got == ["during"], 20, what="the parent's message")
            consumer = sub._consumer
            assert isinstance(consumer, StompConsumer)
            code: int | None
            if how == "os.fork":
                pid = os.fork()
                if pid == 0:
                    _in_child(c, q, f"{name}-child", consumer)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                ctx = multiprocessing.get_context("fork")
                p = ctx.Process(target=_in_child, args=(c, q, f"{name}-child", consumer))
                p.start()
                p.join(60)
                code = p.exitcode
            assert code == 0, f"the child exited with {code}"
            q.send("after")
            wait_for(lambda: len(got) == 3, 20, what="the child's and the parent's messages")
            assert got[0] == "during" and "after" in got
            assert any(g.startswith("sent by child ") for g in got)
            assert consumer.reconnects == 0  # the child left its connection alone
        # the parent kept its own connections, untouched by the child
        assert c.link() is parent_link and parent_link.usable()
        assert producer._link is parent_producer_link and parent_link.pid == os.getpid()
        _round_trip(q, "after the fork")
        assert kew.Queue(c, f"{name}-child", str).browser().stats().ready == 0
    finally:
        c.delete(name)
        c.delete(f"{name}-child")
        c.close()


# -- RabbitMQ delay queues --------------------------------------------------------------


@pytest.mark.slow
def test_a_delay_queue_outlives_its_first_declare() -> None:
    """RabbitMQ's STOMP plugin declares a queue once per connection, and a
    delay queue expires DELAY_EXPIRES ms (+ its TTL) after its last declare:
    a producer that keeps its connection must not send to a delay queue it
    declared long ago (that queue is gone, and the broker receipts a
    message sent to no queue).  It takes a new connection, whose SEND
    declares the queue again, so the second message arrives too."""
    require_rabbitmq_stomp()
    c = kew.connect(RABBIT)
    name = f"delay-expiry-{os.urandom(3).hex()}"
    q = kew.Queue(c, name, str)
    try:
        q.send("declares the target queue")
        producer = cast(StompProducer, q.producer)
        producer.send(Message("first", b'"first"', {}, deliver_at=now_ms() + 100))
        first_link = producer._link
        time.sleep(DELAY_EXPIRES / 1000 + 1.5)  # what is tested is the passing of time
        producer.send(Message("second", b'"second"', {}, deliver_at=now_ms() + 100))
        assert producer._link is not first_link  # a new connection redeclared the delay queue
        got: list[str] = []
        with q.sink(got.append):
            wait_for(lambda: len(got) == 3, 20, what="both delayed messages")
        assert sorted(got) == ["declares the target queue", "first", "second"]
    finally:
        c.delete(name)
        c.close()
