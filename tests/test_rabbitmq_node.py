"""kew_rabbitmq against the session's own RabbitMQ node: a broker restart
(SIGKILL) mid-run loses nothing confirmed, and amqps:// with the node's
own certificate."""

import threading
from pathlib import Path

import pytest

import kew
from kew.testing.util import wait_for
from tests.brokers.rabbitmq import RabbitMQServer
from tests.brokers.tls import make_certs


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_broker_killed_and_restarted_loses_nothing_confirmed(
    rabbitmq_node: RabbitMQServer, queue_type: str
) -> None:
    conn = kew.connect(f"{rabbitmq_node.url}&queue_type={queue_type}")
    name = f"restart-{queue_type}"
    q = kew.Queue(conn, name, int)  # durable queue, persistent messages
    got: set[int] = set()
    confirmed: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            try:
                if i % 2:
                    q.send(i)
                else:
                    q.send_many([i])  # the transaction path too
            except kew.KewError as e:
                failures.append(repr(e))  # not confirmed: send it again
                continue
            confirmed.append(i)
            i += 1

    t = threading.Thread(target=produce)
    try:
        with q.sink(got.add, concurrency=4):
            t.start()
            wait_for(lambda: len(got) >= 200, 60, what="consumption before the restart")
            rabbitmq_node.restart()
            n = len(confirmed)
            wait_for(lambda: len(confirmed) >= n + 200, 120, what="sends after the restart")
            stop.set()
            t.join(60)
            wait_for(lambda: set(confirmed) <= got, 120, what="every confirmed message")
    finally:
        stop.set()
        t.join(60)
        conn.delete(name)
        conn.close()
    assert not set(confirmed) - got
    assert max(got) >= n  # consumers resumed by themselves on the restarted node


def test_amqps_round_trip_and_wrong_ca_refused(
    rabbitmq_node: RabbitMQServer, tmp_path: Path
) -> None:
    conn = kew.connect(rabbitmq_node.ssl_url)
    q = kew.Queue(conn, "tls", str)
    got: list[str] = []
    try:
        q.send("over TLS")
        with q.sink(got.append):
            wait_for(lambda: got, 20, what="the message over TLS")
        assert got == ["over TLS"]
    finally:
        conn.delete("tls")
        conn.close()

    other = make_certs(tmp_path)  # a CA that did not sign the node's certificate
    bad = f"amqps://127.0.0.1:{rabbitmq_node.ssl_port}/?retries=0&ca_certs={other['ca']}"
    with pytest.raises(kew.BrokerUnavailable, match=r"(?i)TLS handshake.*certificate"):
        kew.Queue(kew.connect(bad), "tls", str).declare()
    system = f"amqps://127.0.0.1:{rabbitmq_node.ssl_port}/?retries=0"  # the system CAs
    with pytest.raises(kew.BrokerUnavailable, match=r"(?i)certificate"):
        kew.Queue(kew.connect(system), "tls", str).declare()
    # no fallback to plain text, either way round
    tls_to_plain = f"amqps://127.0.0.1:{rabbitmq_node.port}/?retries=0&ca_certs={other['ca']}"
    with pytest.raises(kew.BrokerUnavailable, match="TLS handshake"):
        kew.Queue(kew.connect(tls_to_plain), "tls", str).declare()
    plain_to_tls = f"amqp://127.0.0.1:{rabbitmq_node.ssl_port}/?retries=0"
    with pytest.raises(kew.BrokerUnavailable):
        kew.Queue(kew.connect(plain_to_tls), "tls", str).declare()
