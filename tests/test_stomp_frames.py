"""The frames kew_artemis builds, per dialect (pure functions, no broker)."""

import pytest

from kew.qchan.spi import ConfigError, Message, SendError
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
