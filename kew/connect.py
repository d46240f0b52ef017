"""``kew.connect(url)``: find the provider for a URL's scheme.

Providers register under the entry-point group ``kew.providers``: the name
is the URL scheme, the value a ``module:function`` taking the URL and
returning a :class:`~kew.qchan.spi.Connector`, with the extra that
installs its client library (``"kew_redis:connect [redis]"``).  kew's own
providers are registered the same way, in ``pyproject.toml``: one registry.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import weakref
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from kew.qchan.spi import Connector, ProviderNotFound
from kew.qchan.spi.urls import redact

DEFAULT_URL = "sqlite:///kew.sqlite3"
"""The URL used when none is given and ``KEW_URL`` is unset: an SQLite file
in the working directory."""

#: The distribution that installs kew (``pip install ome-kew``); extras
#: install a provider's client library (``pip install 'ome-kew[redis]'``).
DISTRIBUTION = "ome-kew"

_GROUP = "kew.providers"

#: The URL each connector :func:`connect` made was given, password included:
#: kept here, out of sight (not on the connector: never in its repr, its
#: ``url`` or a log), for :func:`connect_again`.
_URLS: weakref.WeakKeyDictionary[Connector, str] = weakref.WeakKeyDictionary()


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def _registry() -> dict[str, EntryPoint]:
    """scheme -> entry point: the one registry, kew's own providers included
    (``pyproject.toml``); the entry point's extra names what to install."""
    return {ep.name: ep for ep in entry_points(group=_GROUP)}


def known_schemes() -> list[str]:
    """The URL schemes a provider is registered for."""
    return sorted(_registry())


def resolve_url(url: str | None = None) -> str:
    """The URL to use: ``url``, else ``$KEW_URL``, else :data:`DEFAULT_URL`."""
    return url or os.environ.get("KEW_URL") or DEFAULT_URL


def connect(url: str | None = None) -> Connector:
    """Connect to the broker at ``url`` (see :func:`resolve_url`)."""
    url = resolve_url(url)
    scheme, sep, _ = url.partition("://")
    registry = _registry()
    if not registry:
        raise ProviderNotFound(
            f"no kew provider is registered (entry-point group {_GROUP!r}): "
            f"install kew with pip ({DISTRIBUTION}, or pip install -e . in a checkout)"
        )
    if not sep or scheme not in registry:
        raise ProviderNotFound(
            f"no kew provider for {redact(url)!r}; known schemes: {', '.join(sorted(registry))}"
        )
    ep = registry[scheme]
    try:
        module = importlib.import_module(ep.module)
    except ImportError as e:
        hint = f"; install it with: {install_hint(ep.extras[0])}" if ep.extras else ""
        raise ProviderNotFound(
            f"the provider for {scheme}:// ({ep.module}) cannot be imported: {e}{hint}"
        ) from None
    factory = cast(Callable[[str], Connector], getattr(module, ep.attr or "connect"))
    connector = factory(url)
    with contextlib.suppress(TypeError):  # a third party's, without weak references
        _URLS[connector] = url
    return connector


def connect_again(connector: Connector) -> Connector | None:
    """A new connector to the broker ``connector`` reaches, made by
    :func:`connect` from the URL ``connector`` was made from, its password
    included (``connector.url`` masks it: it cannot connect again), which
    kew keeps out of sight, never shown; None when ``connector`` was not made
    by :func:`connect`.  The new connector is the caller's to close."""
    try:
        url = _URLS.get(connector)
    except TypeError:
        return None
    return None if url is None else connect(url)


def ping(connector: Connector) -> float:
    """Talk to the broker now and return the seconds it took: ``connect()``
    and ``Queue()`` do no network I/O, so a program that wants to fail fast
    at start-up (a wrong password, a broker down) calls this.  Raises what the
    first operation would (``AccessRefused``, ``BrokerUnavailable``,
    ``ConfigError``).  It declares the queue ``kew.ping``, which stays empty."""
    own = getattr(connector, "ping", None)
    if callable(own):
        return float(own())
    import time

    from kew.qchan.spi import PING_QUEUE

    start = time.monotonic()
    connector.declare(PING_QUEUE)
    return time.monotonic() - start
