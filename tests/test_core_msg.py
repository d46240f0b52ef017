"""kew.core.msg: pure channel types, schedules and the repeater."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kew.core.msg import (
    ChannelMessage,
    CountedSchedule,
    DataSink,
    DataSource,
    FutureTimepoint,
    MessageRepeater,
    RepeatAction,
    ReschedulingSink,
    Schedule,
    now_ms,
)


class ListSource:
    def __init__(self) -> None:
        self.sent: list[ChannelMessage[CountedSchedule, str]] = []

    def send(self, m: ChannelMessage[CountedSchedule, str]) -> None:
        self.sent.append(m)


def test_future_timepoint() -> None:
    before = now_ms()
    t0 = time.time_ns()
    p = FutureTimepoint.after(timedelta(seconds=2))
    # rounded up to the millisecond: never due before the delay has passed
    assert p.epoch_ms * 1_000_000 >= t0 + 2_000_000_000
    assert before + 2000 <= p.epoch_ms <= now_ms() + 2001
    assert FutureTimepoint.after(1.5).epoch_ms >= before + 1500
    with pytest.raises(ValueError, match="non-negative"):
        FutureTimepoint.after(-1)
    with pytest.raises(ValueError, match="aware"):
        FutureTimepoint.at(datetime(2030, 1, 1))
    assert FutureTimepoint.at(datetime(2030, 1, 1, tzinfo=UTC)).epoch_ms == 1893456000000
    assert FutureTimepoint(0).remaining() == timedelta(0)


def test_data_adapters() -> None:
    got: list[str] = []

    class Sink:
        def consume(self, d: str) -> None:
            got.append(d)

    DataSink[int, str](Sink()).consume(ChannelMessage("a", 5))
    src = ListSource()
    DataSource(src).send("b")
    assert got == ["a"] and src.sent == [ChannelMessage("b", None)]


@given(st.lists(st.floats(min_value=0, max_value=100), max_size=5), st.integers(0, 8))
def test_repeater_attempts_at_most_n_plus_one(intervals: list[float], fail_until: int) -> None:
    calls: list[int] = []
    exceeded: list[str] = []

    def consumer(d: str) -> RepeatAction:
        calls.append(1)
        return RepeatAction.REPEAT if len(calls) <= fail_until else RepeatAction.STOP

    r = MessageRepeater(consumer, intervals, exceeded.append)
    count, nxt = 1, r.consume(CountedSchedule.first(), "x")
    while nxt is not None:
        assert nxt.what == "x"
        assert nxt.when.epoch_ms >= now_ms() - 5 + round(intervals[count - 1] * 1000) - 5
        count += 1
        nxt = r.consume(CountedSchedule(nxt.when, count), "x")
    assert (
        len(calls)
        == min(fail_until + 1, len(intervals) + 1)
        == r.max_attempts - max(0, len(intervals) - fail_until)
    )
    assert exceeded == (["x"] if fail_until > len(intervals) else [])


def test_rescheduling_sink_counts_up() -> None:
    src = ListSource()

    class Again:
        def consume(self, current: CountedSchedule, data: str) -> Schedule[str] | None:
            return Schedule(FutureTimepoint(current.when.epoch_ms + 10), data + "!")

    sink = ReschedulingSink(Again(), src)
    sink.consume(ChannelMessage("a", CountedSchedule(FutureTimepoint(100), 3)))
    assert src.sent == [ChannelMessage("a!", CountedSchedule(FutureTimepoint(110), 4))]
    sink.consume(ChannelMessage("b"))  # no metadata: a first delivery
    assert src.sent[1].metadata is not None and src.sent[1].metadata.count == 2
