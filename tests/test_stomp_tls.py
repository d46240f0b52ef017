"""stomp+ssl:// against the tests' own ActiveMQ's stomp+ssl connector, whose
keystore (PKCS12, made with openssl) holds a test-made server certificate."""

from pathlib import Path

import pytest

import kew
from kew.testing.util import wait_for
from tests.brokers.activemq import ActiveMQServer
from tests.brokers.tls import make_certs


def test_tls_round_trip(activemq: ActiveMQServer) -> None:
    conn = kew.connect(activemq.ssl_url)
    q = kew.Queue(conn, "tls-round-trip", str)
    try:
        q.send("over TLS")
        got: list[str] = []
        with q.sink(got.append):
            wait_for(lambda: got, 10, what="the message over TLS")
        assert got == ["over TLS"]
    finally:
        conn.delete(q.name)
        conn.close()


def test_wrong_ca_is_refused_clearly(activemq: ActiveMQServer, tmp_path: Path) -> None:
    other = make_certs(tmp_path)  # a CA that did not sign the broker's certificate
    url = f"stomp+ssl://127.0.0.1:{activemq.ssl_port}/?dialect=activemq&retries=2"
    url += f"&ca_certs={other['ca']}"
    with pytest.raises(kew.BrokerUnavailable, match=r"(?i)certificate verify failed"):
        kew.Queue(kew.connect(url), "tls-wrong-ca", str).declare()


def test_no_fallback_to_plain_text(activemq: ActiveMQServer) -> None:
    # plain STOMP to the TLS port: the broker never talks in clear text
    plain = f"stomp://127.0.0.1:{activemq.ssl_port}/?dialect=activemq&retries=0&connect_timeout=2"
    with pytest.raises(kew.BrokerUnavailable):
        kew.Queue(kew.connect(plain), "tls-plain", str).declare()
    # and TLS to the plain port does not quietly become plain text
    tls_to_plain = activemq.ssl_url.replace(str(activemq.ssl_port), str(activemq.port), 1)
    tls_to_plain = tls_to_plain.replace("retries=3", "retries=0&connect_timeout=2")
    with pytest.raises(kew.BrokerUnavailable):
        kew.Queue(kew.connect(tls_to_plain), "tls-plain", str).declare()
