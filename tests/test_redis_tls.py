"""rediss:// against a redis-server of the test's own with a TLS port."""

from pathlib import Path

import pytest

import kew
from kew.testing.util import require, wait_for
from tests.brokers.redis import RedisServer
from tests.brokers.tls import make_certs


def test_tls_round_trip_and_wrong_ca_refused(tmp_path: Path) -> None:
    require(RedisServer.available(), "redis-server is not installed")
    certs = make_certs(tmp_path)
    server = RedisServer(tmp_path, tls=certs)
    try:
        server.start()
    except AssertionError:
        pytest.skip("this redis-server was built without TLS")
    try:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certs['ca']}"
        q = kew.Queue(kew.connect(url), "tls", str)
        q.send("over TLS")
        got: list[str] = []
        with q.sink(got.append):
            wait_for(lambda: got, 10, what="the message over TLS")
        assert got == ["over TLS"]
        (tmp_path / "other").mkdir()
        other = make_certs(tmp_path / "other")  # a CA that did not sign the server's cert
        bad = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={other['ca']}&retries=0"
        with pytest.raises(kew.BrokerUnavailable, match=r"(?i)certificate"):
            kew.Queue(kew.connect(bad), "tls", str).declare()
        plain = f"redis://127.0.0.1:{server.port}/0?retries=0&socket_timeout=1"
        with pytest.raises(kew.BrokerUnavailable):  # no fallback to plain text
            kew.Queue(kew.connect(plain), "tls", str).declare()
    finally:
        server.kill()


def test_tls_options(tmp_path: Path) -> None:
    """redis-py's TLS options: verification off (``ssl_cert_reqs=none``, no
    CA), on with the host name checked, and client certificate files."""
    require(RedisServer.available(), "redis-server is not installed")
    certs = make_certs(tmp_path)
    server = RedisServer(tmp_path, tls=certs)
    try:
        server.start()
    except AssertionError:
        pytest.skip("this redis-server was built without TLS")
    base = f"rediss://127.0.0.1:{server.port}/0?retries=0"
    try:
        unverified = kew.Queue(kew.connect(base + "&ssl_cert_reqs=none"), "tls-opts", str)
        unverified.send("unverified")
        assert unverified.browser().stats().ready == 1
        checked = f"{base}&ssl_ca_certs={certs['ca']}&ssl_check_hostname=true"
        checked += (
            f"&ssl_cert_reqs=required&ssl_certfile={certs['cert']}&ssl_keyfile={certs['key']}"
        )
        q = kew.Queue(kew.connect(checked), "tls-opts", str)
        got: list[str] = []
        with q.sink(got.append):
            wait_for(lambda: got, 10, what="the message over TLS")
        assert got == ["unverified"]
        with pytest.raises(kew.ConfigError, match="ssl_cert_reqs"):
            kew.connect(base + "&ssl_cert_reqs=maybe")
        with pytest.raises(kew.BrokerUnavailable, match=r"(?i)certificate"):  # no CA given
            kew.Queue(kew.connect(base), "tls-opts", str).declare()
    finally:
        server.kill()
