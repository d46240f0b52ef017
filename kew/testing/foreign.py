"""The foreign-producer kit: envelopes written by another program, through
the broker's own client, must each end as a delivery or a dead letter with
a reason, while the consumer goes on and says it is alive.

A provider's test module subclasses :class:`ForeignProducerKit` with a
``url`` fixture and a ``writer`` fixture: a :class:`ForeignWriter` that
writes with the raw client (pika, redis-py, stomp.py, sqlite3) exactly what
``docs/wire-format.md`` tells a program in another language to write::

    class TestRedisForeign(ForeignProducerKit):
        RAW_CASES = {"no headers field": DEAD}

        @pytest.fixture
        def url(self) -> str: ...

        @pytest.fixture
        def writer(self, url: str) -> Iterator[ForeignWriter]: ...

Every case runs the same way (``_run``): a good message, the case, another
good message are written by the raw client; then a typed ``kew.Queue`` of
:class:`Item` consumes with ``q.sink``; a message kew itself sends after
them must arrive too.  The good ones are delivered exactly once, the case
ends as expected (delivered, or dead-lettered with a reason that contains
the expected words), nothing is left in flight, and the subscription is
``alive`` and ``healthy()`` throughout.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kew
from kew.qchan.spi import Connector
from kew.testing.util import wait_for

__all__ = [
    "DEAD",
    "DELIVERED",
    "MISSING",
    "CannotWrite",
    "Envelope",
    "ForeignProducerKit",
    "ForeignWriter",
    "Item",
    "good_id",
]


class Item(msgspec.Struct, frozen=True):
    """The type of every queue the kit writes to."""

    seq: int


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Leave the field (id, content type) out of the envelope altogether.
MISSING: Any = _Missing()

DELIVERED = "delivered"
DEAD = "dead"


def good_id() -> str:
    """A message id as kew makes them: 32 hex digits."""
    return os.urandom(16).hex()


@dataclass
class Envelope:
    """What a foreign program writes: a body, a message id (``MISSING`` to
    leave it out, or any value the client can carry), a content type and
    headers of any type the client can carry."""

    body: bytes
    id: Any = field(default_factory=good_id)
    content_type: Any = "application/json"
    headers: dict[str, Any] = field(default_factory=dict)


class CannotWrite(Exception):
    """The raw client (or the broker) cannot carry this envelope at all:
    the case does not apply to this provider, and the test says why."""


class ForeignWriter(Protocol):
    """Writes to kew's queues as another program would (docs/wire-format.md)."""

    def write(self, queue: str, envelope: Envelope) -> None:
        """Write one message durably; raise :class:`CannotWrite` when the
        client cannot express it."""
        ...

    def write_raw(self, queue: str, case: str, seq: int) -> None:
        """Write the provider-specific malformed case named ``case`` (one of
        the kit subclass's ``RAW_CASES``); ``seq`` is a body's number."""
        ...

    def close(self) -> None: ...


def _body(seq: int) -> bytes:
    return msgspec.json.encode(Item(seq))


#: The cases every provider runs: (what to write, expected outcome, words
#: the dead letter's reason must contain).  ``seq`` 100 marks the case.
CASES: dict[str, tuple[Callable[[], Envelope], str, str]] = {
    "plain good": (lambda: Envelope(_body(100)), DELIVERED, ""),
    "no message id": (lambda: Envelope(_body(100), id=MISSING), DEAD, "message id"),
    "empty message id": (lambda: Envelope(_body(100), id=""), DEAD, "message id"),
    "oversized message id": (lambda: Envelope(_body(100), id="i" * 300), DEAD, "message id"),
    "non-ASCII message id": (lambda: Envelope(_body(100), id="ïd-ünïcode"), DEAD, "message id"),
    "no content type": (lambda: Envelope(_body(100), content_type=MISSING), DELIVERED, ""),
    "foreign content type, JSON body": (
        lambda: Envelope(_body(100), content_type="text/plain"),
        DELIVERED,
        "",
    ),
    "msgpack body on a JSON queue": (
        lambda: Envelope(msgspec.msgpack.encode(Item(100)), content_type="application/msgpack"),
        DEAD,
        "application/msgpack",
    ),
    "empty body": (lambda: Envelope(b""), DEAD, "decode"),
    "garbage body": (lambda: Envelope(b"\xff\xfe\x00garbage"), DEAD, "decode"),
    "header: UTF-8 bytes": (
        lambda: Envelope(_body(100), headers={"note": "ünïcode".encode()}),
        DELIVERED,
        "",
    ),
    "header: bytes not UTF-8": (
        lambda: Envelope(_body(100), headers={"blob": b"\xff\xfe"}),
        DEAD,
        "blob",
    ),
    "header: float": (lambda: Envelope(_body(100), headers={"ratio": 1.5}), DEAD, "ratio"),
    "header: boolean": (lambda: Envelope(_body(100), headers={"flag": True}), DEAD, "flag"),
    "header: null": (lambda: Envelope(_body(100), headers={"nothing": None}), DEAD, "nothing"),
    "header: nested table": (
        lambda: Envelope(_body(100), headers={"table": {"a": 1}}),
        DEAD,
        "table",
    ),
    "header: list": (lambda: Envelope(_body(100), headers={"items": [1, 2]}), DEAD, "items"),
    "header: huge text": (
        lambda: Envelope(_body(100), headers={"huge": "h" * 60_000}),
        DELIVERED,
        "",
    ),
    "header: big integer": (
        lambda: Envelope(_body(100), headers={"big": 2**62}),
        DELIVERED,
        "",
    ),
    "10,000 headers": (
        lambda: Envelope(_body(100), headers={f"h{i}": i for i in range(10_000)}),
        DELIVERED,
        "",
    ),
    "bad kew-deliver-at": (
        lambda: Envelope(_body(100), headers={"kew-deliver-at": "soon"}),
        DEAD,
        "kew-deliver-at",
    ),
}


_header_values = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**62), 2**62),
    st.binary(max_size=8),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 9), max_size=3),
)
_envelopes = st.builds(
    Envelope,
    body=st.one_of(
        st.builds(_body, st.integers(1000, 10**6)),
        st.binary(max_size=64),
        st.just(b'{"seq": "x"}'),
    ),
    id=st.one_of(
        st.builds(good_id),
        st.just(MISSING),
        st.text(max_size=20),
        st.text(alphabet="abcdef0123456789", min_size=1, max_size=40),
    ),
    content_type=st.sampled_from(["application/json", MISSING, "text/plain"]),
    headers=st.dictionaries(
        st.sampled_from(["kew-sent-at", "kew-count", "kew-deliver-at", "kew-type"])
        | st.text(alphabet="abcdefgh-_", min_size=1, max_size=10),
        _header_values,
        max_size=4,
    ),
)


def _case_names(metafunc: pytest.Metafunc, arg: str, names: list[str]) -> None:
    if arg in metafunc.fixturenames:
        metafunc.parametrize(arg, names, ids=[n.replace(" ", "-") for n in names])


class ForeignProducerKit:
    """Subclass with ``url`` and ``writer`` fixtures (see the module doc)."""

    #: Provider-specific malformed cases: name -> DEAD or DELIVERED.
    RAW_CASES: ClassVar[dict[str, str]] = {}
    #: Expected outcomes that differ on this provider: case -> (outcome, words).
    OVERRIDES: ClassVar[dict[str, tuple[str, str]]] = {}
    #: Seconds to wait for a case to settle.
    timeout: ClassVar[float] = 20.0
    #: Envelopes hypothesis makes in ``test_fuzzed_envelopes``.
    fuzz_examples: ClassVar[int] = 40

    @classmethod
    def pytest_generate_tests(cls, metafunc: pytest.Metafunc) -> None:
        _case_names(metafunc, "case", list(CASES))
        _case_names(metafunc, "raw_case", list(cls.RAW_CASES))

    # -- fixtures ----------------------------------------------------------

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("a foreign-producer test class must define a `url` fixture")

    @pytest.fixture
    def writer(self, url: str) -> Iterator[ForeignWriter]:
        raise NotImplementedError("a foreign-producer test class must define a `writer` fixture")

    @pytest.fixture
    def connector(self, url: str) -> Iterator[Connector]:
        c = kew.connect(url)
        yield c
        c.close()

    @pytest.fixture
    def queue_name(self, url: str) -> Iterator[str]:
        name = f"foreign-{os.urandom(5).hex()}"
        yield name
        c = kew.connect(url)
        try:
            c.delete(name)
        finally:
            c.close()

    # -- the cases -----------------------------------------------------------

    def test_envelope(
        self, case: str, connector: Connector, writer: ForeignWriter, queue_name: str
    ) -> None:
        make, outcome, words = CASES[case]
        outcome, words = self.OVERRIDES.get(case, (outcome, words))
        self._run(connector, writer, queue_name, lambda q: writer.write(q, make()), outcome, words)

    def test_raw(
        self, raw_case: str, connector: Connector, writer: ForeignWriter, queue_name: str
    ) -> None:
        outcome = self.RAW_CASES[raw_case]
        self._run(
            connector,
            writer,
            queue_name,
            lambda q: writer.write_raw(q, raw_case, 100),
            outcome,
            "malformed envelope" if outcome == DEAD else "",
        )

    def test_duplicate_ids_are_both_delivered(
        self, connector: Connector, writer: ForeignWriter, queue_name: str
    ) -> None:
        """kew does not deduplicate on consume (``kew.idempotency`` does,
        for handlers that need it): two messages with one id both arrive."""
        same = good_id()

        def two(q: str) -> None:
            writer.write(q, Envelope(_body(100), id=same))
            writer.write(q, Envelope(_body(101), id=same))

        self._run(connector, writer, queue_name, two, DELIVERED, "", extra={101})

    def test_fuzzed_envelopes(
        self, connector: Connector, writer: ForeignWriter, queue_name: str
    ) -> None:
        """Envelopes made by hypothesis through the raw writer: every one
        ends delivered or dead-lettered, and the subscription stays alive."""
        written: list[Envelope] = []

        @settings(
            max_examples=self.fuzz_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(_envelopes)
        def write(envelope: Envelope) -> None:
            try:
                writer.write(queue_name, envelope)
            except CannotWrite:
                return
            written.append(envelope)

        connector.declare(queue_name)
        write()
        q = kew.Queue(connector, queue_name, Item)
        got: list[int] = []
        sub = q.sink(lambda item: got.append(item.seq))
        try:
            wait_for(
                lambda: len(got) + len(q.dead.list(1000)) >= len(written),
                self.timeout * 2,
                what=f"{len(written)} envelopes delivered or dead",
            )
            assert sub.alive and sub.healthy()
        finally:
            sub.stop()
        assert len(got) + len(q.dead.list(1000)) == len(written)
        assert all(d.reason for d in q.dead.list(1000))

    # -- how a case runs -------------------------------------------------------

    def _run(
        self,
        connector: Connector,
        writer: ForeignWriter,
        queue_name: str,
        write_case: Callable[[str], None],
        outcome: str,
        words: str,
        extra: set[int] | None = None,
    ) -> None:
        connector.declare(queue_name)
        q = kew.Queue(connector, queue_name, Item)
        writer.write(queue_name, Envelope(_body(1)))
        try:
            write_case(queue_name)
        except CannotWrite as e:
            pytest.skip(f"not expressible on this broker: {e}")
        writer.write(queue_name, Envelope(_body(2)))
        got: list[int] = []
        lock = threading.Lock()

        def handle(item: Item) -> None:
            with lock:
                got.append(item.seq)

        expected = {1, 2, 3} | (extra or set()) | ({100} if outcome == DELIVERED else set())
        sub = q.sink(handle)
        browser = q.browser()
        try:
            q.send(Item(3))  # kew's own message after the foreign ones
            wait_for(
                lambda: expected <= set(got), self.timeout, what=f"messages {sorted(expected)}"
            )
            dead = []
            if outcome == DEAD:
                dead = wait_for(lambda: q.dead.list(), self.timeout, what="the dead letter")
            wait_for(
                lambda: sub.in_flight == 0 and browser.stats().ready == 0,
                self.timeout,
                what="nothing left ready or in flight",
            )
            assert sub.alive, "the subscription says it is not alive"
            assert sub.healthy(), "the subscription says it is not healthy"
        finally:
            sub.stop()
        with lock:
            assert sorted(got) == sorted(expected), f"delivered {sorted(got)}"
        if outcome == DEAD:
            assert len(dead) == 1, f"dead letters: {dead}"
            assert words.lower() in dead[0].reason.lower(), dead[0].reason
        else:
            assert q.dead.list() == []
