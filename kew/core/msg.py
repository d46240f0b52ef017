"""Typed channels, schedules and repeaters. Pure: no I/O, no threads.

A *source* is where you put data in (``send``), a *sink* is what consumes it
(``consume``).  Messages pair data with optional, typed metadata; the
metadata of a scheduling channel is the delivery time, that of a
rescheduling channel a :class:`CountedSchedule` (time and delivery count).
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeAlias, TypeVar

T = TypeVar("T")
D = TypeVar("D")
M = TypeVar("M")
T_contra = TypeVar("T_contra", contravariant=True)

Delay: TypeAlias = "timedelta | float"
"""A delay: a ``timedelta`` or a number of seconds."""


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit of every time kew
    stores or sends (and of the provider SPI)."""
    return time.time_ns() // 1_000_000


def _delay_ms(delay: Delay) -> int:
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not seconds >= 0:
        raise ValueError(f"a delay must be non-negative, not {delay!r}")
    return round(seconds * 1000)


class ChannelSource(Protocol[T_contra]):
    """Puts data into a channel."""

    def send(self, data: T_contra, /) -> None:
        """Return once the channel accepted ``data`` (durably, if it is)."""
        ...


class ChannelSink(Protocol[T_contra]):
    """Consumes data taken from a channel."""

    def consume(self, data: T_contra, /) -> None:
        """Handle ``data``; an exception means it was not consumed (a queue dead-letters it)."""
        ...


@dataclass(frozen=True, slots=True)
class ChannelMessage(Generic[M, D]):
    """Data with optional metadata."""

    data: D
    metadata: M | None = None


MessageSource: TypeAlias = ChannelSource[ChannelMessage[M, D]]
MessageSink: TypeAlias = ChannelSink[ChannelMessage[M, D]]


class FunctionSink(Generic[T]):
    """A plain function as a :class:`ChannelSink`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[T], object]) -> None:
        self.fn = fn

    def consume(self, data: T, /) -> None:
        self.fn(data)


def as_sink(consumer: ChannelSink[T] | Callable[[T], object]) -> ChannelSink[T]:
    """A sink from a sink or a function of the data."""
    if callable(consumer) and not hasattr(consumer, "consume"):
        return FunctionSink(consumer)
    return consumer


class DataSource(Generic[M, D]):
    """A plain data source over a message source: sends no metadata."""

    __slots__ = ("_source",)

    def __init__(self, source: MessageSource[M, D]) -> None:
        self._source = source

    def send(self, data: D, /) -> None:
        self._source.send(ChannelMessage(data))


class DataSink(Generic[M, D]):
    """A message sink over a plain data sink: drops the metadata."""

    __slots__ = ("_sink",)

    def __init__(self, sink: ChannelSink[D]) -> None:
        self._sink = sink

    def consume(self, message: ChannelMessage[M, D], /) -> None:
        self._sink.consume(message.data)


# -- time -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class FutureTimepoint:
    """An absolute instant, in epoch milliseconds, at or after its making."""

    epoch_ms: int

    @classmethod
    def now(cls) -> FutureTimepoint:
        """The current instant."""
        return cls(now_ms())

    @classmethod
    def after(cls, delay: Delay) -> FutureTimepoint:
        """Now plus a non-negative ``delay``, rounded up to the next
        millisecond: never due before the delay has passed."""
        ms = _delay_ms(delay)
        if ms == 0:
            return cls.now()
        return cls(-(-(time.time_ns() + ms * 1_000_000) // 1_000_000))

    @classmethod
    def at(cls, when: datetime) -> FutureTimepoint:
        """The instant of an aware ``datetime``."""
        if when.tzinfo is None:
            raise ValueError("FutureTimepoint.at needs an aware datetime (with tzinfo)")
        return cls(round(when.timestamp() * 1000))

    def remaining(self) -> timedelta:
        """How long until this instant (zero once it has passed)."""
        return timedelta(milliseconds=max(0, self.epoch_ms - now_ms()))


@dataclass(frozen=True, slots=True)
class Schedule(Generic[T]):
    """What to deliver, and when."""

    when: FutureTimepoint
    what: T


@dataclass(frozen=True, slots=True)
class CountedSchedule:
    """A delivery time and the delivery count (1 for the first delivery)."""

    when: FutureTimepoint
    count: int

    @classmethod
    def first(cls) -> CountedSchedule:
        """The first delivery: now, count 1."""
        return cls(FutureTimepoint.now(), 1)

    def next(self, when: FutureTimepoint) -> CountedSchedule:
        """The next delivery, at ``when``, with the count one higher."""
        return CountedSchedule(when, self.count + 1)


class SchedulingSource(ABC, Generic[T]):
    """A message source whose metadata is the delivery time."""

    @abstractmethod
    def send(self, message: ChannelMessage[FutureTimepoint, T], /) -> None:
        """Send ``message.data`` for delivery at ``message.metadata`` (None: at once)."""
        ...

    def send_at(self, when: FutureTimepoint | datetime, data: T) -> None:
        """Send ``data`` for delivery at ``when`` (a timepoint or an aware ``datetime``)."""
        point = FutureTimepoint.at(when) if isinstance(when, datetime) else when
        self.send(ChannelMessage(data, point))

    def send_after(self, delay: Delay, data: T) -> None:
        """Send ``data`` for delivery after ``delay`` (a ``timedelta`` or seconds)."""
        self.send(ChannelMessage(data, FutureTimepoint.after(delay)))

    def send_now(self, data: T) -> None:
        """Send ``data`` for delivery at once."""
        self.send(ChannelMessage(data))


# -- rescheduling ------------------------------------------------------------


class Reschedulable(Protocol[T]):
    """A consumer that may ask for its data to be delivered again."""

    def consume(self, current: CountedSchedule, data: T, /) -> Schedule[T] | None:
        """Consume ``data``; return when (and what) to deliver next, or None."""
        ...


class ReschedulingSink(Generic[T]):
    """Feeds a :class:`Reschedulable` and puts what it returns back on the
    channel, with the count one higher."""

    def __init__(
        self, consumer: Reschedulable[T], source: MessageSource[CountedSchedule, T]
    ) -> None:
        self._consumer = consumer
        self._source = source

    def consume(self, message: ChannelMessage[CountedSchedule, T], /) -> None:
        """Feed the consumer (a message without metadata is the first delivery) and send
        the schedule it returns, if any, back to the channel."""
        current = message.metadata or CountedSchedule.first()
        nxt = self._consumer.consume(current, message.data)
        if nxt is not None:
            self._source.send(ChannelMessage(nxt.what, current.next(nxt.when)))


class RepeatAction(enum.Enum):
    """What a repeat handler (:meth:`kew.Queue.repeat_sink`, :class:`MessageRepeater`)
    returns: ``REPEAT`` to be delivered again after the next interval, ``STOP`` when done."""

    REPEAT = "repeat"
    STOP = "stop"


class MessageRepeater(Generic[T]):
    """Retries a consumer on given intervals, then hands over to a handler.

    With intervals ``d[0..n-1]`` there are at most n+1 attempts: attempt c
    (1-based) that returns ``REPEAT`` is delivered again after ``d[c-1]``;
    attempt n+1 that returns ``REPEAT`` goes to ``on_exceeded``.  No
    intervals: one attempt.
    """

    def __init__(
        self,
        consumer: Callable[[T], RepeatAction],
        retry_intervals: Sequence[Delay],
        on_exceeded: Callable[[T], object],
    ) -> None:
        self._consumer = consumer
        self._intervals = [_delay_ms(d) for d in retry_intervals]
        self._on_exceeded = on_exceeded

    @property
    def max_attempts(self) -> int:
        """How many times the consumer may run for one piece of data: intervals + 1."""
        return len(self._intervals) + 1

    def consume(self, current: CountedSchedule, data: T, /) -> Schedule[T] | None:
        """Run the consumer on delivery ``current.count``: None when it returns ``STOP`` or
        when the attempts are used up (then ``on_exceeded`` got the data), else the next
        delivery after the interval for this count."""
        if self._consumer(data) is RepeatAction.STOP:
            return None
        if current.count <= len(self._intervals):
            delay = self._intervals[current.count - 1]
            return Schedule(FutureTimepoint(now_ms() + delay), data)
        self._on_exceeded(data)
        return None
