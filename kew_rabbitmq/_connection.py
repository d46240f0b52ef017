"""Opening a pika connection, in kew's errors; and connections that belong
to one process.

:func:`open_connection` tries the URL's hosts in order, starting with the
one that took the process's last connection (a cluster node that died, or
hangs, is not waited on first at every reconnect), ``retries`` rounds
after the first with :class:`~kew.qchan.spi.kit.Backoff` delays between
rounds (pika itself never retries), and raises kew's errors only, pika's as
the cause:

=============================================  ===============================
what happened                                  raised
=============================================  ===============================
the login refused (``ACCESS_REFUSED``), the    :class:`AccessRefused`, at once,
virtual host unknown or forbidden              never retried
(``NOT_ALLOWED``), no common SASL mechanism
the TLS handshake failed (certificate not      :class:`BrokerUnavailable`, at
trusted, a plain-text port)                    once
the port accepts TCP but answers nothing AMQP  :class:`BrokerUnavailable`, once
within ``stack_timeout`` (Redis, HTTP, ...)    that timeout is spent on every
                                               host (one that hangs is
                                               passed over for the next)
refused, reset, closed during the handshake,   :class:`BrokerUnavailable` after
timed out                                      the retries
=============================================  ===============================

pika's connections are not fork-safe: a connection belongs to the process
that opened it.  :func:`reset_in_child` has an object's ``_in_child()``
called in a child made by ``os.fork`` (or ``multiprocessing`` with the fork
start method) before the child does anything else: it drops the parent's
connections unused (never a frame on the parent's sockets) and the locks
the parent's threads may have held, and the child opens its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import threading
import time
import weakref
from typing import Any

import pika
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)
from pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    AuthenticationError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from kew.qchan.spi import AccessRefused, BrokerUnavailable
from kew_rabbitmq._options import Options

# The broker's reply to a refused connection.open, in pika's words:
# ... ConnectionClosedByBroker: (530) 'NOT_ALLOWED - vhost nowhere not found'
_BROKER_SAID = re.compile(r"\((\d{3})\) (?:'(.*)'|\"(.*)\")")


def open_connection(options: Options, stop: threading.Event | None = None) -> Any:
    """A ``pika.BlockingConnection`` to the first host that takes it; kew's
    errors only (the module's table).  ``stop`` ends the waits between
    rounds (a closing consumer): BrokerUnavailable then."""
    started = time.monotonic()
    backoff = options.backoff()
    last: dict[str, str] = {}
    cause: BaseException | None = None
    attempts = 0
    hosts = _in_turn(options.params)
    for round_ in range(options.retries + 1):
        if round_ and backoff.wait(stop):
            break
        hung: list[str] = []  # hosts that took TCP but not the AMQP handshake
        for i, params in hosts:
            attempts += 1
            where = f"{params.host}:{params.port}"
            try:
                conn = pika.BlockingConnection(params)
            except ssl.SSLError as e:
                # a certificate or protocol mismatch does not heal by
                # retrying; and there is no falling back to plain text
                hint = ""
                if isinstance(e, ssl.SSLCertVerificationError):
                    hint = " (the server's certificate is not trusted: check ca_certs)"
                raise BrokerUnavailable(
                    f"TLS handshake with RabbitMQ at {options.url} ({where}) failed{hint}: {e}"
                ) from e
            except AMQPConnectorStackTimeout as e:
                # not AMQP, or a node that hangs (stopped, overloaded, cut
                # off): the next host may answer
                hung.append(where)
                last[where], cause = f"no AMQP handshake within {options.stack_timeout:g} s", e
            except AMQPConnectionError as e:
                refused = _refused(e, options)
                if refused is not None:
                    raise refused from e
                last[where], cause = _handshake_hint(e, _why(e)), e
            except (AMQPConnectorException, AMQPError, OSError) as e:
                last[where], cause = _why(e), e
            else:
                _ANSWERED[_key(options.params)] = i
                return conn
        if len(hung) == len(hosts):  # not retried: it would take as long again
            raise BrokerUnavailable(
                f"RabbitMQ at {options.url}: {', '.join(hung)} accepted the connection but did "
                f"not complete the AMQP 0-9-1 handshake within {options.stack_timeout:g} s "
                "(stack_timeout): it does not speak AMQP 0-9-1 (another protocol's port? "
                "a TLS port needs amqps://), or the broker is overloaded"
            ) from cause
    took = time.monotonic() - started
    raise BrokerUnavailable(
        f"RabbitMQ at {options.url} is unreachable after {attempts} attempt(s) over "
        f"{len(options.params)} host(s) in {took:.1f} s: "
        + "; ".join(f"{where}: {why}" for where, why in last.items())
    ) from cause


#: Per list of hosts (a URL's), the index of the host that took the last
#: connection this process opened.
_ANSWERED: dict[tuple[tuple[str, int], ...], int] = {}


def _key(params: list[pika.ConnectionParameters]) -> tuple[tuple[str, int], ...]:
    return tuple((str(p.host), int(p.port)) for p in params)


def _in_turn(params: list[pika.ConnectionParameters]) -> list[tuple[int, Any]]:
    """The hosts in the URL's order, starting with the one that took the
    last connection: once a node is down, or hangs, each new connection
    does not wait on it first (a dead host may cost ``socket_timeout``, a
    hung one ``stack_timeout``, at every reconnect)."""
    first = _ANSWERED.get(_key(params), 0) % len(params)
    order = list(enumerate(params))
    return order[first:] + order[:first]


def _refused(e: AMQPConnectionError, options: Options) -> AccessRefused | None:
    """AccessRefused if the broker refused the login or the virtual host:
    only the broker's own refusal counts (pika guesses from the stage the
    connection ended at), not a connection lost meanwhile."""
    if isinstance(e, AuthenticationError):  # no common SASL mechanism
        return AccessRefused(
            f"RabbitMQ at {options.url} refused the login of user {options.username!r}: "
            f"no authentication mechanism in common ({_why(e)})"
        )
    if not isinstance(e, ProbableAuthenticationError | ProbableAccessDeniedError):
        return None
    said = _why(e)
    if "ACCESS_REFUSED" not in said and "NOT_ALLOWED" not in said:
        return None
    if "vhost" in said.lower() and "Login was refused" not in said:
        what = f"access to virtual host {options.vhost!r} for user {options.username!r}"
    else:
        what = f"the login of user {options.username!r} (authentication failed)"
    return AccessRefused(f"RabbitMQ at {options.url} refused {what}: {said}")


def _why(e: BaseException) -> str:
    """The innermost cause pika wraps, in words (``[Errno 111] Connection
    refused``, ``(403) ACCESS_REFUSED - ...``)."""
    inner: BaseException = e
    for _ in range(10):
        nested = getattr(inner, "exception", None)  # pika's connector phase errors
        if nested is None and inner.args and isinstance(inner.args[0], BaseException):
            nested = inner.args[0]
        if not isinstance(nested, BaseException):
            break
        inner = nested
    text = str(inner.args[0]) if len(inner.args) == 1 else str(inner)
    said = _BROKER_SAID.search(text)
    if said:
        return f"({said.group(1)}) {said.group(2) or said.group(3)}"
    return text or type(inner).__name__


def _handshake_hint(e: AMQPConnectionError, why: str) -> str:
    if type(e).__name__ == "IncompatibleProtocolError":
        return (
            f"the server closed the connection during the AMQP handshake ({why}): "
            "not an AMQP 0-9-1 port? (a TLS port needs amqps://)"
        )
    return why


def coalesce(conn: Any) -> None:
    """One socket write for a batch: pika writes every frame (three per
    message, one per ack) with its own send(), and on loopback each send()
    costs the sender the receiver's TCP work too; join what is buffered.  An
    optimisation only: without pika's internals as expected, nothing
    changes."""
    buffers = getattr(
        getattr(getattr(conn, "_impl", None), "_transport", None), "_tx_buffers", None
    )
    if buffers is not None and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)


def nothing() -> None:
    """A callback that only wakes ``process_data_events`` (it returns early
    for its own events only, not for callbacks of the channels underneath)."""


def close_quietly(conn: Any) -> None:
    """Close ``conn`` if it is open, whatever pika says."""
    if conn is not None and conn.is_open:
        with contextlib.suppress(Exception):
            conn.close()


# -- one process's connections -------------------------------------------------

_IN_CHILD: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_child(obj: Any) -> None:
    """Have ``obj._in_child()`` called first thing in a child made by fork."""
    _IN_CHILD.add(obj)


def _after_fork() -> None:
    for obj in list(_IN_CHILD):
        with contextlib.suppress(Exception):
            obj._in_child()


os.register_at_fork(after_in_child=_after_fork)
