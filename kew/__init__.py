"""kew: typed, asynchronous messaging over pluggable brokers.

    import kew
    q = kew.Queue(kew.connect(), "thumbnails", Thumbnail)   # SQLite by default
    q.send(Thumbnail(image_id=1))
    with q.sink(render, concurrency=4):
        ...

See docs/getting-started.md; the task layer is :mod:`kew.task`.
"""

from kew.connect import DEFAULT_URL, connect, known_schemes, ping
from kew.core.msg import (
    ChannelMessage,
    ChannelSink,
    ChannelSource,
    CountedSchedule,
    FutureTimepoint,
    MessageRepeater,
    RepeatAction,
    Reschedulable,
    ReschedulingSink,
    Schedule,
    SchedulingSource,
)
from kew.qchan import DeadLetters, InvalidValue, Queue, QueueBrowser, Subscription
from kew.qchan.codec import DecodeError
from kew.qchan.spi import (
    AccessRefused,
    BrokerUnavailable,
    ConfigError,
    KewError,
    MessageTooLarge,
    ProviderNotFound,
    QueueFull,
    QueueStats,
    SendError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "AccessRefused",
    "BrokerUnavailable",
    "ChannelMessage",
    "ChannelSink",
    "ChannelSource",
    "ConfigError",
    "CountedSchedule",
    "DeadLetters",
    "DecodeError",
    "FutureTimepoint",
    "InvalidValue",
    "KewError",
    "MessageRepeater",
    "MessageTooLarge",
    "ProviderNotFound",
    "Queue",
    "QueueBrowser",
    "QueueFull",
    "QueueStats",
    "RepeatAction",
    "Reschedulable",
    "ReschedulingSink",
    "Schedule",
    "SchedulingSource",
    "SendError",
    "Subscription",
    "connect",
    "known_schemes",
    "ping",
]
