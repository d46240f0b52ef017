"""Which STOMP server answers on a port, so that a test talks to the broker
it means: the ``server`` header of the CONNECTED frame (``RabbitMQ/3.10.8``,
``ActiveMQ/5.17.2``), read with raw stomp.py.

``scripts/install-stomp-brokers`` enables RabbitMQ's STOMP plugin only when
port 61613 is free; when another STOMP server already listens there (seen:
an ActiveMQ that accepts any password), the "RabbitMQ STOMP" tests would
run against it and fail with timeouts that say nothing.  They call
:func:`require_rabbitmq_stomp` instead, which skips (fails under CI) naming
what answered.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import stomp

from kew.testing.util import port_open, require

__all__ = [
    "RABBITMQ_STOMP",
    "Answer",
    "listener_pids",
    "probe",
    "require_rabbitmq_stomp",
    "require_stomp_server",
    "who_listens",
]

#: Where the machine's RabbitMQ serves STOMP (scripts/install-stomp-brokers).
RABBITMQ_STOMP = ("127.0.0.1", 61613)


@dataclass(frozen=True)
class Answer:
    """What a STOMP CONNECT got: the ``server`` header of the CONNECTED
    frame (``""`` when the frame had none; None when there was no CONNECTED
    frame), or ``problem`` saying why not."""

    server: str | None
    problem: str = ""


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.server: str | None = None
        self.error = ""
        self.done = threading.Event()

    def on_connected(self, frame: Any) -> None:
        self.server = str(frame.headers.get("server", ""))
        self.done.set()

    def on_error(self, frame: Any) -> None:
        body = frame.body.decode("utf-8", "replace") if isinstance(frame.body, bytes) else ""
        self.error = (frame.headers.get("message", "") + " " + body[:200]).strip()
        self.done.set()


def probe(
    host: str,
    port: int,
    *,
    login: str | None = None,
    passcode: str | None = None,
    vhost: str | None = None,
    ca_certs: str | None = None,
    timeout: float = 5.0,
) -> Answer:
    """Connect once with raw stomp.py (TLS when ``ca_certs`` is given) and
    say which server answered."""
    listener = _Listener()
    conn: Any = stomp.Connection12(
        [(host, port)],
        auto_decode=False,
        vhost=vhost or host,
        timeout=timeout,
        reconnect_attempts_max=1,
        heartbeats=(0, 0),
    )
    if ca_certs:
        conn.set_ssl(for_hosts=[(host, port)], ca_certs=ca_certs)
    conn.set_listener("probe", listener)
    try:  # no wait=True: stomp.py would wait for ever on a server that never answers
        conn.connect(login, passcode, wait=False)
        listener.done.wait(timeout)
    except Exception as e:
        listener.error = listener.error or f"{type(e).__name__}: {e}".rstrip(": ")
    finally:
        with contextlib.suppress(Exception):
            conn.disconnect()
    if listener.server is None:
        why = listener.error or f"nothing within {timeout:g} s"
        return Answer(None, f"no CONNECTED frame ({why})")
    return Answer(listener.server)


def who_listens(port: int) -> str:
    """The process listening on a TCP port, as ``ss`` tells it (best effort)."""
    try:
        out = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (ss failed)"
    return " ".join(out.split()) or "unknown (ss shows no listener)"


def listener_pids(port: int) -> set[int]:
    """The ids of the processes listening on a TCP port (empty if unknown)."""
    return {int(pid) for pid in re.findall(r"pid=(\d+)", who_listens(port))}


def require_stomp_server(
    expected: str,
    host: str,
    port: int,
    *,
    login: str | None = None,
    passcode: str | None = None,
    vhost: str | None = None,
) -> str:
    """Skip the calling test (fail under CI) unless the STOMP server on
    ``host:port`` says it is ``expected`` (``RabbitMQ``, ``ActiveMQ``);
    the message names what answered.  Returns its ``server`` header."""
    where = f"{host}:{port}"
    require(port_open(host, port), f"{expected} STOMP is not reachable on {where}")
    answer = _cached_probe(host, port, login, passcode, vhost)
    if answer.server is None:
        require(
            False,
            f"the server on {where} does not let {login or 'no login'} in as {expected} "
            f"STOMP would: {answer.problem}; listening there: {who_listens(port)}",
        )
    server = answer.server or ""
    require(
        server.startswith(f"{expected}/"),
        f"{where} is answered by {server or 'a STOMP server without a server header'!r}, "
        f"not {expected}: the {expected} STOMP tests would talk to the wrong broker; "
        f"listening there: {who_listens(port)} (see scripts/install-stomp-brokers)",
    )
    return server


@functools.lru_cache(maxsize=16)
def _cached_probe(
    host: str, port: int, login: str | None, passcode: str | None, vhost: str | None
) -> Answer:
    return probe(host, port, login=login, passcode=passcode, vhost=vhost)


def require_rabbitmq_stomp() -> str:
    """The machine's RabbitMQ STOMP plugin on 127.0.0.1:61613, guest/guest."""
    host, port = RABBITMQ_STOMP
    return require_stomp_server("RabbitMQ", host, port, login="guest", passcode="guest", vhost="/")
