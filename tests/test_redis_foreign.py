"""Stream entries another program wrote, with raw redis-py, exactly as
docs/providers/redis.md tells it to (or damaged): each one ends as a
delivery or a dead letter with a reason, and the consumer goes on."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

import kew
from kew.qchan.spi import Connector, now_ms
from kew.qchan.spi.wire import INT_HEADERS, Malformed
from kew.testing.foreign import (
    DEAD,
    DELIVERED,
    MISSING,
    CannotWrite,
    Envelope,
    ForeignProducerKit,
    ForeignWriter,
    Item,
    good_id,
)
from kew.testing.util import port_open, require, wait_for

URL = "redis://127.0.0.1:6379/15?lease=1&max_message_size=1048576"
GROUP = "kew"


def _body(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


class RedisForeignWriter:
    """Another program: raw redis-py, writing what docs/providers/redis.md
    describes.  A message is a stream entry on ``<prefix>:{<queue>}`` with
    the fields ``id`` (the message id), ``body`` (the encoded value) and
    ``headers`` (a JSON object: text or integer values, the content type as
    ``content-type``); a delayed one a member of the sorted set
    ``<prefix>:{<queue>}:delayed`` scored by its due time (epoch ms), packed
    as ``<len(id)>:<id><len(headers)>:<headers><body>``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.prefix = parse_qs(parts.query).get("prefix", ["kew"])[0]
        self.r: Any = redis.Redis(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.strip("/") or 0),
        )

    def key(self, queue: str, suffix: str = "") -> str:
        return f"{self.prefix}:{{{queue}}}{suffix}"

    @staticmethod
    def headers(envelope: Envelope) -> bytes:
        h: dict[str, Any] = {}
        if envelope.content_type is not MISSING:
            h["content-type"] = envelope.content_type
        for name, value in envelope.headers.items():
            if isinstance(value, bytes):
                try:
                    value = value.decode()
                except UnicodeDecodeError:
                    raise CannotWrite("JSON text cannot hold bytes that are not UTF-8") from None
            h[name] = value  # floats, booleans, null, tables, lists: JSON has them
        return json.dumps(h, ensure_ascii=False).encode()

    def write(self, queue: str, envelope: Envelope) -> None:
        fields: dict[str, Any] = {}
        if envelope.id is not MISSING:
            if not isinstance(envelope.id, str | bytes | int):
                raise CannotWrite(f"a stream field holds bytes, not {type(envelope.id).__name__}")
            fields["id"] = envelope.id
        fields["body"] = envelope.body
        fields["headers"] = self.headers(envelope)
        self.r.xadd(self.key(queue), fields)

    def write_delayed(self, queue: str, member: bytes, due: float) -> None:
        self.r.zadd(self.key(queue, ":delayed"), {member: due})

    def write_raw(self, queue: str, case: str, seq: int) -> None:
        body = _body(seq)
        headers = b'{"content-type": "application/json"}'
        if case.startswith("delayed"):
            member = {
                "delayed, packed as documented, due": b"32:%s%d:%s%s"
                % (good_id().encode(), len(headers), headers, body),
                "delayed, not packed": b"seq=%d, please" % seq,
                "delayed, a length longer than the member": b"99:short",
            }[case]
            self.write_delayed(queue, member, 0)
            return
        entries: dict[str, dict[str, Any]] = {
            "no headers field": {"id": good_id(), "body": body},
            "no id field": {"body": body, "headers": headers},
            "no body field": {"id": good_id(), "headers": headers},
            "headers not JSON": {"id": good_id(), "body": body, "headers": b"{content-type"},
            "headers not UTF-8": {"id": good_id(), "body": body, "headers": b'{"a": "\xff"}'},
            "headers a JSON array": {"id": good_id(), "body": body, "headers": b'["a", 1]'},
            "headers a JSON string": {"id": good_id(), "body": body, "headers": b'"text"'},
            "headers with a float value": {
                "id": good_id(),
                "body": body,
                "headers": b'{"ratio": 1.5}',
            },
            "foreign fields only": {"event": "created", "payload": body},
            "id field not UTF-8 bytes": {"id": b"\xff\xfeid", "body": body, "headers": headers},
            "an extra unknown field": {
                "id": good_id(),
                "body": body,
                "headers": headers,
                "trace": "abc",
            },
        }
        self.r.xadd(self.key(queue), entries[case])

    def close(self) -> None:
        self.r.close()


def _raw_url() -> str:
    require(port_open("127.0.0.1", 6379), "Redis is not reachable on 127.0.0.1:6379")
    return URL


class TestRedisForeign(ForeignProducerKit):
    # An unknown field is ignored (docs/wire-format.md: a consumer ignores
    # what it does not know), like an unknown header: a producer may add
    # its own fields.  They are not kept if the message is dead-lettered.
    RAW_CASES = {
        "no headers field": DEAD,
        "no id field": DEAD,
        "no body field": DEAD,
        "headers not JSON": DEAD,
        "headers not UTF-8": DEAD,
        "headers a JSON array": DEAD,
        "headers a JSON string": DEAD,
        "headers with a float value": DEAD,
        "foreign fields only": DEAD,
        "id field not UTF-8 bytes": DEAD,
        "an extra unknown field": DELIVERED,
        "delayed, packed as documented, due": DELIVERED,
        "delayed, not packed": DEAD,
        "delayed, a length longer than the member": DEAD,
    }

    @pytest.fixture
    def url(self) -> str:
        return _raw_url()

    @pytest.fixture
    def writer(self, url: str) -> Iterator[ForeignWriter]:
        w = RedisForeignWriter(url)
        yield w
        w.close()


# -- the defect, and what else another program can do -----------------------


@pytest.fixture
def raw() -> Iterator[RedisForeignWriter]:
    w = RedisForeignWriter(_raw_url())
    yield w
    w.close()


@pytest.fixture
def connector() -> Iterator[Connector]:
    c = kew.connect(_raw_url())
    yield c
    c.close()


@pytest.fixture
def name(connector: Connector) -> Iterator[str]:
    queue = f"foreign-{os.urandom(5).hex()}"
    yield queue
    connector.delete(queue)


def _fetch_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fetching from" in r.getMessage()]


def _pending(raw: RedisForeignWriter, queue: str) -> int:
    return int(raw.r.xpending(raw.key(queue), GROUP)["pending"])


class _Collect:
    def __init__(self) -> None:
        self.got: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, item: Item) -> None:
        with self._lock:
            self.got.append(item.seq)

    def seqs(self) -> list[int]:
        with self._lock:
            return sorted(self.got)


def test_an_entry_without_headers_is_dead_lettered_and_the_next_one_delivered(
    raw: RedisForeignWriter,
    connector: Connector,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The defect: ``XADD kew:{q} * id <32 hex> body '{"seq":1}'`` made every
    fetch fail with KeyError b'headers', and the good entry after it never
    arrived."""
    caplog.set_level(logging.WARNING)
    connector.declare(name)
    bad_id = good_id()
    raw.r.xadd(raw.key(name), {"id": bad_id, "body": b'{"seq":1}'})
    raw.write(name, Envelope(_body(2)))
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got) as sub:
        wait_for(lambda: got.seqs() == [2], 10, what="the good entry")
        dead = wait_for(lambda: q.dead.list(), 10, what="the dead letter")
        wait_for(lambda: sub.in_flight == 0, 10, what="nothing in flight")
        assert sub.alive and sub.healthy()
    assert [d.id for d in dead] == [bad_id]  # the id, the body kept
    assert dead[0].body == b'{"seq":1}' and dead[0].headers == {}
    assert dead[0].reason == "malformed envelope: the stream entry has no headers field"
    assert _pending(raw, name) == 0 and raw.r.xlen(raw.key(name)) == 0
    assert _fetch_failures(caplog) == []


def test_malformed_entries_interleaved_with_good_ones(
    raw: RedisForeignWriter,
    connector: Connector,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every kind of bad entry between good ones, many in one XREADGROUP
    batch: each bad one is dead-lettered, every good one delivered once."""
    caplog.set_level(logging.WARNING)
    connector.declare(name)
    cases = [c for c, outcome in TestRedisForeign.RAW_CASES.items() if outcome == DEAD]
    cases = [c for c in cases if not c.startswith("delayed")] * 2
    for seq, case in enumerate(cases):
        raw.write(name, Envelope(_body(seq)))
        raw.write_raw(name, case, 1000 + seq)
    raw.write(name, Envelope(_body(len(cases))))
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got, concurrency=4, prefetch=64) as sub:
        wait_for(lambda: got.seqs() == list(range(len(cases) + 1)), 20, what="every good one")
        wait_for(lambda: len(q.dead.list(1000)) == len(cases), 20, what="every bad one dead")
        wait_for(lambda: sub.in_flight == 0, 10, what="nothing in flight")
        assert sub.alive and sub.healthy()
    assert got.seqs() == list(range(len(cases) + 1))  # once each
    assert all(d.reason.startswith("malformed envelope: ") for d in q.dead.list(1000))
    assert _pending(raw, name) == 0 and raw.r.xlen(raw.key(name)) == 0
    assert _fetch_failures(caplog) == []


def test_malformed_entries_left_pending_by_a_dead_consumer_are_dead_lettered_on_reclaim(
    raw: RedisForeignWriter,
    connector: Connector,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Entries another consumer read and never acked (it died, or it was
    an older kew that could not read them) are reclaimed after the lease:
    the bad one is dead-lettered with its delivery count, the good one
    delivered."""
    caplog.set_level(logging.WARNING)
    connector.declare(name)
    raw.write_raw(name, "headers a JSON array", 1)
    raw.write(name, Envelope(_body(2)))
    read = raw.r.xreadgroup(GROUP, "died", {raw.key(name): ">"}, count=10)
    assert len(read[0][1]) == 2 and _pending(raw, name) == 2
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got) as sub:
        wait_for(lambda: got.seqs() == [2], 15, what="the good entry, reclaimed")
        dead = wait_for(lambda: q.dead.list(), 10, what="the bad entry, dead")
        wait_for(lambda: sub.in_flight == 0, 10, what="nothing in flight")
        assert sub.alive and sub.healthy()
    assert dead[0].delivery_count == 2 and "not a JSON object" in dead[0].reason
    assert _pending(raw, name) == 0 and raw.r.xlen(raw.key(name)) == 0
    assert _fetch_failures(caplog) == []


def test_dead_letters_of_malformed_entries_list_requeue_and_purge(
    raw: RedisForeignWriter, connector: Connector, name: str
) -> None:
    """A dead letter without a message id is listed under its entry id;
    requeued, it comes back as kew kept it (the float header left out) and
    is delivered; a dead letter another program wrote with fields missing
    is listed and purged."""
    connector.declare(name)
    raw.r.xadd(raw.key(name), {"body": _body(7), "headers": b'{"ratio": 1.5, "note": "x"}'})
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got) as sub:
        dead = wait_for(lambda: q.dead.list(), 10, what="the dead letter")
        assert len(dead) == 1 and "no message id" in dead[0].reason
        entry_id = dead[0].id  # the stream entry id stands in
        assert raw.r.xrange(raw.key(name, ":dead"))[0][1][b"id"] == entry_id.encode()
        assert dead[0].headers == {"note": "x"} and dead[0].body == _body(7)
        assert dead[0].delivery_count == 1
        assert q.dead.requeue([entry_id]) == 1
        wait_for(lambda: got.seqs() == [7], 10, what="the requeued message")
        wait_for(lambda: sub.in_flight == 0, 10, what="nothing in flight")
    assert q.dead.list() == []
    raw.r.xadd(raw.key(name, ":dead"), {"body": b"something", "why": "no idea"})
    listed = q.dead.list()
    assert len(listed) == 1 and listed[0].body == b"something"
    assert listed[0].reason == "(no reason recorded)" and listed[0].delivery_count == 1
    assert listed[0].dead_at > 0
    assert q.dead.purge([listed[0].id]) == 1 and q.dead.list() == []


def test_peek_shows_a_malformed_entry_as_it_will_be_kept(
    raw: RedisForeignWriter, connector: Connector, name: str
) -> None:
    connector.declare(name)
    raw.r.xadd(raw.key(name), {"id": good_id(), "body": _body(1), "headers": b"[1]"})
    raw.write(name, Envelope(_body(2), headers={"k": 1}))
    browser = connector.browser(name)
    peeked = browser.peek(10)
    assert [m.body for m in peeked] == [_body(1), _body(2)]
    assert peeked[0].headers == {} and peeked[1].headers == {
        "content-type": "application/json",
        "k": 1,
    }
    assert browser.stats().ready == 2


@pytest.mark.parametrize("how", ["XGROUP DESTROY", "DEL"])
def test_the_group_destroyed_or_the_stream_deleted_by_another_program(
    raw: RedisForeignWriter,
    connector: Connector,
    name: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The consumer creates the group again and goes on consuming."""
    caplog.set_level(logging.WARNING)
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got) as sub:
        q.send(Item(1))
        wait_for(lambda: got.seqs() == [1], 10, what="the first message")
        wait_for(lambda: _pending(raw, name) == 0, 10, what="the first message acked")
        if how == "DEL":
            raw.r.delete(raw.key(name))
        else:
            assert raw.r.xgroup_destroy(raw.key(name), GROUP) == 1
        assert q.browser().stats().in_flight == 0  # no group: nothing in flight
        raw.write(name, Envelope(_body(2)))
        q.send(Item(3))
        wait_for(lambda: got.seqs() == [1, 2, 3], 15, what="consumption to resume")
        wait_for(lambda: sub.in_flight == 0, 10, what="nothing in flight")
        assert sub.alive and sub.healthy()
    assert _pending(raw, name) == 0
    assert any("creating the group again" in r.getMessage() for r in caplog.records)


def test_double_ack_and_settling_twice_are_no_ops(
    raw: RedisForeignWriter, connector: Connector, name: str
) -> None:
    connector.declare(name)
    for seq in range(3):
        raw.write(name, Envelope(_body(seq)))
    consumer = connector.consumer(name, 10)
    try:
        got = wait_for(lambda: consumer.fetch(3, 1.0), 10, what="three deliveries")
        assert len(got) == 3
        first, second, third = got
        consumer.ack(first)
        consumer.ack(first)
        consumer.dead_letter(first, "too late")
        consumer.release(first)
        consumer.dead_letter(second, "bad")
        consumer.ack(second)
        consumer.dead_letter(second, "bad again")
        consumer.release(third)
        consumer.ack(third)  # released: no longer this consumer's to ack
    finally:
        consumer.close()
    assert raw.r.xlen(raw.key(name, ":dead")) == 1
    assert raw.r.xlen(raw.key(name)) == 1 and _pending(raw, name) == 1  # third, handed back
    again = connector.consumer(name, 10)
    try:
        redelivered = wait_for(lambda: again.fetch(3, 1.0), 10, what="the released one")
        assert [d.message.body for d in redelivered] == [_body(2)]
        assert redelivered[0].delivery_count == 2
        again.ack(redelivered[0])
        again.ack(redelivered[0])
    finally:
        again.close()
    assert raw.r.xlen(raw.key(name)) == 0 and _pending(raw, name) == 0


def test_a_delayed_member_that_is_never_due_does_not_stop_the_consumer(
    raw: RedisForeignWriter,
    connector: Connector,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A score of +inf (the mover reports the next due time) is never due."""
    caplog.set_level(logging.WARNING)
    connector.declare(name)
    raw.write_delayed(name, b"forever", float("inf"))
    q = kew.Queue(connector, name, Item)
    got = _Collect()
    with q.sink(got) as sub:
        q.send(Item(1))
        q.post(Item(2), deliver_at=now_ms() + 300)
        wait_for(lambda: got.seqs() == [1, 2], 10, what="the messages")
        assert sub.alive and sub.healthy()
    assert q.browser().stats().delayed == 1 and q.dead.list() == []
    assert _fetch_failures(caplog) == []


def test_the_key_prefix_option(connector: Connector) -> None:
    """With ``?prefix=``, the keys are ``<prefix>:{<queue>}...``."""
    url = _raw_url() + "&prefix=elsewhere"
    raw = RedisForeignWriter(url)
    c = kew.connect(url)
    queue = f"foreign-{os.urandom(5).hex()}"
    try:
        c.declare(queue)
        assert raw.key(queue) == f"elsewhere:{{{queue}}}" and raw.r.exists(raw.key(queue))
        raw.write(queue, Envelope(_body(5)))
        got = _Collect()
        with kew.Queue(c, queue, Item).sink(got):
            wait_for(lambda: got.seqs() == [5], 10, what="the message")
    finally:
        c.delete(queue)
        c.close()
        raw.close()


def test_what_kew_writes_is_what_the_writer_writes(
    raw: RedisForeignWriter, connector: Connector, name: str
) -> None:
    """The documented format is kew's own: a message kew sends reads back
    with the same fields and types the foreign writer uses."""
    q = kew.Queue(connector, name, Item)
    q.send(Item(4))
    ((_, fields),) = raw.r.xrange(raw.key(name))
    assert set(fields) == {b"id", b"body", b"headers"}
    assert len(fields[b"id"]) == 32 and msgspec.json.decode(fields[b"body"]) == {"seq": 4}
    headers = json.loads(fields[b"headers"])
    assert headers["content-type"] == "application/json"
    assert isinstance(headers["kew-sent-at"], int)


# -- the fast read of kew's own entries ------------------------------------------------

_values = st.one_of(
    st.text(max_size=8),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.booleans(),
    st.floats(allow_nan=False),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_names = st.one_of(st.sampled_from(sorted(INT_HEADERS | {"content-type", "kew-type"})), st.text())


@settings(max_examples=400, deadline=None)
@given(
    mid=st.one_of(
        st.binary(max_size=300),
        st.text(alphabet="0123456789abcdefXYZ-_ é", max_size=260).map(str.encode),
    ),
    headers=st.one_of(
        st.dictionaries(_names, _values, max_size=4).map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=40),
    ),
    body=st.one_of(st.binary(max_size=8), st.none()),
)
def test_the_fast_read_of_an_entry_agrees_with_every_check(
    mid: bytes, headers: bytes, body: bytes | None
) -> None:
    """kew_redis._entries.message takes kew's own entries at once; on any
    entry it answers what the full checks of kew.qchan.spi.wire answer (the
    same message, or Malformed with the same reason)."""
    from kew_redis import _entries

    fields: dict[bytes, Any] = {b"id": mid, b"headers": headers}
    if body is not None:
        fields[b"body"] = body

    def read(fn: Any) -> object:
        try:
            return fn(fields)
        except Malformed as e:
            return f"Malformed: {e}"

    assert read(_entries.message) == read(_entries._checked)
