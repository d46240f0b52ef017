"""The driver of the grouped-acks crash tests, for either front door: the
sync kit's (:mod:`kew.testing._mid_group` consuming through
``kew.qchan.runtime``) and the asyncio runtime's
(tests/test_aio_window_crash.py).  Each consuming process says, a line at
a time, ``RETURNED <id>`` as a handler returns, ``COMMITTED <ids>`` once
its one ack (group) that goes through is done, ``COMMITTING <ids>`` as the
next one starts and hangs, ``STUCK <id>`` as a handler that never returns
starts; the driver SIGKILLs it at ``STUCK`` and checks what it said and
what comes back."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

from kew.qchan.spi import Connector, Delivery, Message
from kew.testing.util import wait_for

_KINDS = ("RETURNED", "COMMITTED", "COMMITTING", "STUCK")


def check_mid_group_crash(
    connector: Connector,
    queue: str,
    command: Sequence[str],
    *,
    timeout: float,
    acked_stays: bool,
) -> None:
    """Send 10 messages to ``queue`` (declared), run ``command`` (the
    consuming process) until it says ``STUCK``, SIGKILL it, and check that
    one ack was done alone before the rest hung, no ack started before its
    handler returned, and every delivery whose ack was not done comes back
    within ``timeout`` seconds, none lost.  ``acked_stays``: the one acked
    must not come back (an ack is a round trip); else it may (a one-way
    frame the kill can lose)."""
    ids = [f"g{i}" for i in range(10)]
    connector.producer(queue).send_many([Message(i, b"x") for i in ids])
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("STUCK"):
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    said = [w for w in (line.split() for line in lines) if w and w[0] in _KINDS]
    committed = [i for kind, *rest in said if kind == "COMMITTED" for i in rest]
    assert len(committed) == 1, f"one ack done alone, then the acks hang: {lines}"
    first = committed[0]
    assert lines.index(f"RETURNED {first}") < lines.index(f"COMMITTED {first}")  # after
    # every ack that was started came after its handler returned
    for kind, *rest in said:
        if kind == "COMMITTING":
            at = lines.index(" ".join([kind, *rest]))
            assert all(lines.index(f"RETURNED {i}") < at for i in rest), lines
    assert any(kind == "COMMITTING" for kind, *_ in said), lines
    held = {rest[0] for kind, *rest in said if kind in ("RETURNED", "STUCK")}
    assert said[-1][0] == "STUCK" and len(held) >= 6, lines
    back: dict[str, Delivery] = {}
    consumer = connector.consumer(queue, 10)
    try:

        def all_back() -> bool:
            for d in consumer.fetch(10, 0.5):
                back[d.message.id] = d
            return len(back) >= 9

        wait_for(all_back, timeout, what="the unacked back")
        back.update((d.message.id, d) for d in consumer.fetch(10, 0.5))
        for d in back.values():
            consumer.ack(d)
    finally:
        consumer.close()
    # Every delivery whose ack was not done comes back, none lost; the one
    # acked stays acked where an ack is a round trip (SQLite, Redis); where
    # it is a one-way frame (AMQP, STOMP) the kill may lose it on the wire,
    # and it comes back too: at least once.
    assert set(back) - {first} == set(ids) - {first} and set(back) <= set(ids)
    assert all(back[i].delivery_count >= 2 for i in held & set(back))
    if acked_stays:
        assert first not in back
