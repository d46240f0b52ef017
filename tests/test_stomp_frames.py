"""The frames kew_artemis builds, per dialect (pure functions, no broker)."""

import pytest

from kew.qchan.spi import ConfigError, Message, SendError
from kew.qchan.spi.kit import DELAY_EXPIRES
from kew_artemis._link import _Link
from kew_artemis.provider import (
    H_INTS,
    Options,
    _from_frame,
    destination,
    send_frame,
    send_headers,
    subscribe_headers,
)

NOW = 1_700_000_000_000


def test_artemis_addresses_queues_anycast() -> None:
    assert destination("artemis", "jobs") == "jobs"
    h = send_headers("artemis", Message("m1", b"x"), now=NOW)
    assert h["destination-type"] == "ANYCAST"
    assert h["persistent"] == "true" and h["kew-id"] == "m1"
    sub = subscribe_headers("artemis", 5)
    assert sub["subscription-type"] == "ANYCAST"


def test_other_dialects_use_queue_prefix() -> None:
    for dialect in ("activemq", "rabbitmq"):
        assert destination(dialect, "jobs") == "/queue/jobs"
        assert "destination-type" not in send_headers(dialect, Message("m", b""), now=NOW)


def test_artemis_schedules_by_absolute_time() -> None:
    h = send_headers("artemis", Message("m", b"", deliver_at=NOW + 1500), now=NOW)
    assert h["AMQ_SCHEDULED_TIME"] == str(NOW + 1500)
    assert "AMQ_SCHEDULED_DELAY" not in h


def test_activemq_schedules_by_delay() -> None:
    h = send_headers("activemq", Message("m", b"", deliver_at=NOW + 1500), now=NOW)
    assert h["AMQ_SCHEDULED_DELAY"] == "1500"
    assert "AMQ_SCHEDULED_TIME" not in h


def test_due_message_is_not_scheduled() -> None:
    for dialect in ("artemis", "activemq", "rabbitmq"):
        h = send_headers(dialect, Message("m", b"", deliver_at=NOW - 5), now=NOW)
        assert not any(k.startswith("AMQ_SCHEDULED") for k in h)


def test_rabbitmq_delays_through_a_ttl_queue_rounded_up() -> None:
    m = Message("m", b"", deliver_at=NOW + 1234)
    dest, h = send_frame("rabbitmq", "jobs", m, now=NOW, granularity=100)
    assert dest == "/queue/jobs.delay.1300"
    assert h["x-message-ttl"] == "1300" and h["x-dead-letter-routing-key"] == "jobs"
    assert h["x-dead-letter-exchange"] == "" and int(h["x-expires"]) > 1300
    assert not any(k.startswith("AMQ_") for k in h)
    assert send_frame("rabbitmq", "jobs", Message("n", b""), now=NOW)[0] == "/queue/jobs"
    # the other dialects keep the queue and schedule with headers
    assert send_frame("activemq", "jobs", m, now=NOW)[0] == "/queue/jobs"
    with pytest.raises(SendError):  # headers alone cannot delay on RabbitMQ
        send_headers("rabbitmq", m, now=NOW)


def test_prefetch_headers_per_dialect() -> None:
    assert subscribe_headers("artemis", 4)["consumer-window-size"] == "4"
    assert subscribe_headers("artemis", 4, window_bytes=1024)["consumer-window-size"] == "4096"
    assert subscribe_headers("activemq", 4) == {"activemq.prefetchSize": "4"}
    assert subscribe_headers("rabbitmq", 4) == {"prefetch-count": "4"}


def test_durable_flag() -> None:
    h = send_headers("artemis", Message("m", b"", durable=False), now=NOW)
    assert h["persistent"] == "false"


def test_headers_keep_types_and_reserved_names_are_escaped() -> None:
    headers: dict[str, str | int] = {
        "content-type": "application/json",
        "kew-sent-at": NOW,
        "n": -(2**40),
        "s": "a:b\nc",
        "destination": "evil",
        "JMSType": "x",
        "kew-id": "forged",
    }
    wire = send_headers("activemq", Message("real", b"", headers), now=NOW)
    assert wire["kew-id"] == "real"
    assert wire["kew-h-destination"] == "evil" and "destination" not in wire
    assert wire["kew-h-JMSType"] == "x" and wire["kew-h-kew-id"] == "forged"
    assert wire["content-type"] == "application/json"
    # what the broker hands back, with its own headers added
    back = {
        **wire,
        "destination": "/queue/jobs",
        "message-id": "ID:1",
        "ack": "ID:1",
        "subscription": "sub-1",
        "redelivered": "false",
        "content-length": "0",
    }
    m, count = _from_frame(back, b"")
    assert m.id == "real" and count == 1
    assert dict(m.headers) == headers
    assert H_INTS not in m.headers


def test_delivery_count_from_redelivered_flag_and_kew_releases() -> None:
    base = {"kew-id": "m"}
    assert _from_frame({**base, "redelivered": "true"}, b"")[1] == 2
    assert _from_frame({**base, "kew-redeliveries": "2"}, b"")[1] == 3
    assert _from_frame({**base, "kew-redeliveries": "2", "redelivered": "true"}, b"")[1] == 4


def test_url_options() -> None:
    o = Options.from_url("stomp://u:p@h1:61613,h2:61614/?dialect=activemq&heartbeat=0")
    assert o.hosts == [("h1", 61613), ("h2", 61614)]
    assert (o.login, o.passcode, o.dialect, o.heartbeat) == ("u", "p", "activemq", 0)
    assert Options.from_url("stomp://h").dialect == "artemis"
    with pytest.raises(ConfigError, match="dialect"):
        Options.from_url("stomp://h/?dialect=qpid")
    with pytest.raises(ConfigError, match="stomp\\+ssl"):
        Options.from_url("stomp://h/?ca_certs=/x.pem")
    with pytest.raises(ConfigError, match="unknown option"):
        Options.from_url("stomp://h/?prefetch=3")
    with pytest.raises(ConfigError) as e:
        Options.from_url("stomp://u:s3cret@h/?retries=x")
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("ints", ["5", "{", '{"a": 1}', "[1, null]", '["n"]'])
def test_damaged_kew_ints_never_break_reading(ints: str) -> None:
    m, count = _from_frame({"kew-id": "m", "kew-ints": ints, "n": "x7"}, b"body")
    assert m.id == "m" and m.body == b"body" and count == 1
    assert m.headers["n"] == "x7"  # listed as int but not a number: kept as text


def test_stomp_py_options_are_read_and_the_rest_refused_with_the_list() -> None:
    url = (
        "stomp+ssl://u:p@h/?heartbeats=1000,0&heart_beat_receive_scale=1.5&keepalive=off"
        "&bind_host_port=10.0.0.5:0&cert_file=/c.pem&key_file=/k.pem&ssl_password=kp"
        "&verify=false&vhost=v"
    )
    o = Options.from_url(url)
    assert o.heartbeats == (1000, 0) and o.heartbeat == 1000
    assert o.heart_beat_receive_scale == 1.5 and o.keepalive is False
    assert o.bind_host_port == ("10.0.0.5", 0) and o.verify is False
    assert (o.certfile, o.keyfile, o.ssl_password) == ("/c.pem", "/k.pem", "kp")
    assert o.host_header("h") == "v" and "kp" not in repr(o) and "'p'" not in repr(o)
    assert Options.from_url("stomp://h/?bind_host_port=[::1]:0").bind_host_port == ("::1", 0)
    plain = Options.from_url("stomp://h/?dialect=rabbitmq")
    assert plain.heartbeats == (10000, 10000) and plain.keepalive and plain.verify
    assert plain.host_header("h") == "/" and Options.from_url("stomp://h").host_header("h") == "h"
    with pytest.raises(ConfigError) as e:
        Options.from_url("stomp://u:s3cret@h/?reconnect_attempts_max=3&bogus=1&timeout=2")
    text = str(e.value)
    assert "unknown option(s) bogus, reconnect_attempts_max, timeout" in text
    assert "kew reconnects itself" in text and "it is kew's connect_timeout" in text
    accepted = text.split("accepts: ")[1]
    for name in ("dialect", "heartbeats", "keepalive", "bind_host_port", "vhost", "cert_file"):
        assert name in accepted
    assert "s3cret" not in text
    for bad, words in [
        ("stomp://h/?cert_file=/c.pem", "need a stomp\\+ssl:// URL"),
        ("stomp://h/?heartbeat=1&heartbeats=1,1", "give one of the two"),
        ("stomp+ssl://h/?certfile=/a&cert_file=/b", "one option"),
        ("stomp://h/?heartbeats=1000", "send,receive"),
        ("stomp://h/?bind_host_port=10.0.0.5", "host:0"),
        ("stomp://h/?bind_host_port=10.0.0.5:6000", "cannot share one local port"),
        ("stomp://h/?heart_beat_receive_scale=0.5", "heart_beat_receive_scale"),
        ("stomp://h/?passcode=x", "login:passcode@host"),
    ]:
        with pytest.raises(ConfigError, match=words):
            Options.from_url(bad)
    with pytest.raises(ConfigError) as e:  # a key file's password is masked too
        Options.from_url("stomp+ssl://h/?ssl_password=kp-s3cret&retries=x")
    assert "kp-s3cret" not in str(e.value) and "ssl_password=***" in str(e.value)


def test_a_delay_queue_declared_long_ago_on_a_connection_needs_a_new_one() -> None:
    """RabbitMQ's STOMP plugin declares a queue once per connection: a
    connection notes when it first sent to each delay queue, and says when
    that is so long ago that the queue could expire (tests/test_stomp_reconnect.py
    has it on the broker).  Nothing here connects."""
    dest, h = send_frame("rabbitmq", "q", Message("m", b"", deliver_at=NOW + 50), now=NOW)
    assert int(h["x-expires"]) == 100 + DELAY_EXPIRES
    link = _Link(Options.from_url("stomp://h/?dialect=rabbitmq"), "stomp://h")
    assert not link.declares_stale([dest])  # this SEND declares it
    assert not link.declares_stale([dest])
    link.declared[dest] -= DELAY_EXPIRES / 2000  # as if first sent half an expiry ago
    assert link.declares_stale(["/queue/q.delay.900", dest])
    assert link.declares_stale([]) is False
