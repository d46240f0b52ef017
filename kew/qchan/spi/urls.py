"""Broker URLs: parsing, typed query options, and redaction of secrets.

Every provider reads its URL through :class:`ProviderURL`, so they all
accept the same shapes (``scheme://user:pass@host:port,host2:port/path?opt=v``)
and all fail the same way: a :class:`ConfigError` that names the option and
never shows the password.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from kew.qchan.spi.errors import ConfigError

_SECRET_OPTIONS = frozenset({"password", "passcode", "token", "key", "secret", "ssl_password"})


def redact(url: str) -> str:
    """``url`` with its password (and secret-looking options) as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, qmark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hosts}"
    if qmark:
        parts = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            parts.append(f"{name}=***" if eq and name.lower() in _SECRET_OPTIONS else item)
        query = "&".join(parts)
    return f"{scheme}://{netloc}{slash}{path}{qmark}{query}"


@dataclass
class ProviderURL:
    """A parsed broker URL.

    ``hosts`` is a list of ``(host, port)`` (several for a failover list);
    a port missing from the URL is ``None``.  Options are read with the
    typed getters, each of which marks the option as used; ``finish()``
    then rejects any option the provider did not read, so a typo stops
    start-up instead of being ignored.
    """

    scheme: str
    hosts: list[tuple[str, int | None]]
    username: str | None
    password: str | None = field(repr=False)
    path: str
    options: dict[str, str]
    redacted: str
    _used: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def parse(cls, url: str, schemes: Iterable[str]) -> ProviderURL:
        allowed = tuple(schemes)
        safe = redact(url)
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ConfigError(f"not a URL (no '://'): {safe!r}")
        if scheme not in allowed:
            raise ConfigError(f"URL scheme {scheme!r} is not one of {', '.join(allowed)}: {safe!r}")
        rest, _, query = rest.partition("?")
        rest, _, _fragment = rest.partition("#")
        netloc, slash, path = rest.partition("/")
        username = password = None
        if "@" in netloc:
            userinfo, _, netloc = netloc.rpartition("@")
            user, colon, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
        hosts: list[tuple[str, int | None]] = []
        for item in filter(None, netloc.split(",")):
            host, port = _split_host_port(item, safe)
            hosts.append((host, port))
        options: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in options:
                raise ConfigError(f"option {name!r} given twice in {safe!r}")
            options[name] = value
        return cls(scheme, hosts, username, password, unquote(path) if slash else "", options, safe)

    def __str__(self) -> str:
        return self.redacted

    def _take(self, name: str) -> str | None:
        self._used.add(name)
        return self.options.get(name)

    def _bad(self, name: str, value: str, expected: str) -> ConfigError:
        shown = "***" if name.lower() in _SECRET_OPTIONS else repr(value)
        return ConfigError(f"option {name}={shown} in {self.redacted!r}: expected {expected}")

    def get_str(self, name: str, default: str | None = None) -> str | None:
        value = self._take(name)
        return default if value is None else value

    def get_int(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self._take(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise self._bad(name, value, "an integer") from None
        if number < minimum:
            raise self._bad(name, value, f"an integer >= {minimum}")
        return number

    def get_float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._take(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise self._bad(name, value, "a number") from None
        if not number >= minimum:  # also rejects NaN
            raise self._bad(name, value, f"a number >= {minimum}")
        return number

    def get_bool(self, name: str, default: bool) -> bool:
        value = self._take(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise self._bad(name, value, "true or false")

    def get_choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        allowed = tuple(choices)
        value = self._take(name)
        if value is None:
            return default
        if value not in allowed:
            raise self._bad(name, value, f"one of {', '.join(allowed)}")
        return value

    def finish(self) -> None:
        """Raise for every option that no getter read."""
        unknown = sorted(set(self.options) - self._used)
        if unknown:
            known = ", ".join(sorted(self._used)) or "none"
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} in {self.redacted!r}; "
                f"this provider knows: {known}"
            )


def _split_host_port(item: str, safe: str) -> tuple[str, int | None]:
    if item.startswith("["):  # [::1]:port
        host, _, tail = item[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not port_text:
        return host, None
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"port {port_text!r} is not a number in {safe!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range in {safe!r}")
    return host, port
