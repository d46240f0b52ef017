"""``kew.connect(url)``: find the provider for a URL's scheme.

Providers register under the entry-point group ``kew.providers``: the name
is the URL scheme, the value a ``module:function`` taking the URL and
returning a :class:`~kew.qchan.spi.Connector`.  kew's own providers are
also known without installation metadata (running from a source tree).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import cast

from kew.qchan.spi import Connector, ProviderNotFound
from kew.qchan.spi.urls import redact

#: The URL used when none is given and ``KEW_URL`` is unset.
DEFAULT_URL = "sqlite:///kew.sqlite3"

#: scheme -> (target, the extra that installs its client library)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("kew.embedded.memory:connect", None),
    "sqlite": ("kew.embedded.sqlite:connect", None),
    "redis": ("kew_redis:connect", "redis"),
    "rediss": ("kew_redis:connect", "redis"),
    "amqp": ("kew_rabbitmq:connect", "rabbitmq"),
    "amqps": ("kew_rabbitmq:connect", "rabbitmq"),
    "stomp": ("kew_artemis:connect", "artemis"),
    "stomp+ssl": ("kew_artemis:connect", "artemis"),
}


def _registry() -> dict[str, str]:
    found = {scheme: target for scheme, (target, _) in _BUILTIN.items()}
    for ep in entry_points(group="kew.providers"):
        found[ep.name] = ep.value
    return found


def known_schemes() -> list[str]:
    return sorted(_registry())


def resolve_url(url: str | None = None) -> str:
    """The URL to use: ``url``, else ``$KEW_URL``, else :data:`DEFAULT_URL`."""
    return url or os.environ.get("KEW_URL") or DEFAULT_URL


def connect(url: str | None = None) -> Connector:
    """Connect to the broker at ``url`` (see :func:`resolve_url`)."""
    url = resolve_url(url)
    scheme, sep, _ = url.partition("://")
    registry = _registry()
    if not sep or scheme not in registry:
        raise ProviderNotFound(
            f"no kew provider for {redact(url)!r}; known schemes: {', '.join(sorted(registry))}"
        )
    target = registry[scheme]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        extra = _BUILTIN.get(scheme, ("", None))[1]
        hint = f"; install it with: pip install 'kew[{extra}]'" if extra else ""
        raise ProviderNotFound(
            f"the provider for {scheme}:// ({module_name}) cannot be imported: {e}{hint}"
        ) from None
    factory = cast(Callable[[str], Connector], getattr(module, attr or "connect"))
    return factory(url)
