"""Fuzzed inputs: whatever arrives, the consumer goes on, bad messages end in
the dead letters with a reason, and good ones after them still flow."""

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kew
from kew.core.msg import CountedSchedule, Schedule
from kew.qchan.codec import DecodeError, JsonCodec, MsgpackCodec
from kew.qchan.spi import Message
from kew.testing.util import wait_for


class Item(msgspec.Struct):
    n: int
    name: str


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_codecs_raise_only_decode_error(data: bytes) -> None:
    for codec in (JsonCodec(Item), MsgpackCodec(Item), JsonCodec(dict[str, list[int]])):
        try:
            codec.decode(data)
        except DecodeError as e:
            assert str(e)


@settings(max_examples=200, deadline=None)
@given(st.builds(Item, n=st.integers(-(2**63), 2**63 - 1), name=st.text()))
def test_truncated_bodies_are_decode_errors(item: Item) -> None:
    body = JsonCodec(Item).encode(item)
    for cut in {0, 1, len(body) // 2, len(body) - 1}:
        with pytest.raises(DecodeError):
            JsonCodec(Item).decode(body[:cut])


header_values = st.one_of(st.text(max_size=20), st.integers(-(2**62), 2**62), st.just("x" * 10_000))
headers = st.dictionaries(
    st.sampled_from(["content-type", "kew-type", "kew-sent-at", "kew-deliver-at", "kew-count"])
    | st.text(min_size=1, max_size=10),
    header_values,
    max_size=6,
)


@pytest.mark.parametrize("url", ["memory://fuzz", "sqlite"])
def test_consumer_survives_garbage(url: str, tmp_path: Any) -> None:
    if url == "sqlite":
        url = f"sqlite:///{tmp_path}/fuzz.sqlite3"
    conn = kew.connect(url)
    q = kew.Queue(conn, "fuzz", Item)
    raw = conn.producer("fuzz")
    bad: list[Message] = []

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(st.binary(max_size=200), headers)
    def collect(body: bytes, hdrs: dict[str, Any]) -> None:
        try:
            JsonCodec(Item).decode(body)
        except DecodeError:
            bad.append(Message(f"bad-{len(bad)}", body, hdrs))

    collect()
    # the bad ones, each followed by a good one
    for i, m in enumerate(bad):
        raw.send(m)
        q.send(Item(i, "good"))
    got: list[int] = []

    class Reschedule:
        def consume(self, current: CountedSchedule, data: Item) -> Schedule[Item] | None:
            got.append(data.n)
            return None

    with q.reschedulable_sink(Reschedule(), concurrency=2):
        wait_for(lambda: len(got) == len(bad), 30, what="every good message")
        wait_for(lambda: len(q.dead.list(1000)) == len(bad), 30, what="every bad one dead")
    assert sorted(got) == list(range(len(bad)))
    dead = q.dead.list(1000)
    assert {d.id for d in dead} == {m.id for m in bad}
    # A body that is not an Item, or kew's own int headers that are not ints
    # (the provider refuses those before any decode, kew.qchan.spi.wire).
    assert all(d.reason.startswith(("cannot decode", "malformed envelope")) for d in dead)


def test_bad_schedule_headers_are_dead_lettered_with_reason() -> None:
    conn = kew.connect("memory://sched")
    q = kew.Queue(conn, "s", Item)
    conn.producer("s").send(Message("h", b'{"n":1,"name":"a"}', {"kew-count": "two"}))
    seen: list[Any] = []
    with q.message_sink(seen.append):
        dead = wait_for(lambda: q.dead.list(), 10, what="the dead letter")
    assert seen == []
    assert "bad schedule headers" in dead[0].reason and "'two'" in dead[0].reason
