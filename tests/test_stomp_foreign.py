"""Messages from a foreign STOMP producer (raw stomp.py, no kew headers, or
damaged ones) on the tests' own ActiveMQ: good ones are consumed, bad ones
are dead-lettered with a reason, and the consumer keeps going."""

import os
from typing import Any

import stomp

import kew
from kew.testing.util import wait_for
from tests.brokers.activemq import ActiveMQServer


def test_foreign_producer_interoperates(activemq: ActiveMQServer) -> None:
    name = f"foreign-{os.urandom(3).hex()}"
    raw: Any = stomp.Connection12([("127.0.0.1", activemq.port)], auto_decode=False)
    raw.connect(wait=True)
    dest = f"/queue/{name}"
    plain = {"persistent": "true", "content-type": "application/json"}
    raw.send(dest, b'{"n": 1}', headers=plain)  # no kew headers at all
    raw.send(dest, b'{"n": 2}', headers={**plain, "kew-ints": "{", "kew-redeliveries": "x"})
    raw.send(dest, b"not json", headers={**plain, "kew-id": "bad-1"})
    raw.send(dest, b'{"n": 3}', headers={**plain, "kew-id": "good-3", "JMSType": "t"})
    raw.disconnect()
    conn = kew.connect(activemq.url)
    q = kew.Queue(conn, name, dict[str, int])
    got: list[dict[str, int]] = []
    try:
        with q.sink(got.append):
            wait_for(lambda: len(got) == 3, 15, what="the three good messages")
            dead = wait_for(lambda: q.dead.list(), 10, what="the bad one")
        assert got == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert [d.id for d in dead] == ["bad-1"] and "cannot decode" in dead[0].reason
    finally:
        conn.delete(name)
        conn.close()
