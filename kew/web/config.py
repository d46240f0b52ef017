"""Configuration of the web front end: tokens, limits, what the server runs.

A file (TOML, or YAML when PyYAML is installed) holds the settings, either
at its top level or under a ``[web]`` table; the environment overrides it::

    [web]
    max_body_bytes = 1048576
    [[web.tokens]]
    scope = "admin"
    sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    [[web.tokens]]
    scope = "read"
    token = "a-long-random-read-token"

Environment: ``KEW_WEB_READ_TOKENS`` and ``KEW_WEB_ADMIN_TOKENS`` (comma
separated; each a token or ``sha256:<hex digest>``), ``KEW_WEB_MAX_BODY_BYTES``,
``KEW_WEB_ROOT_PATH``.

Tokens are kept only as SHA-256 digests and compared in constant time; a
token never appears in a ``repr``, a log line or a response.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from kew.qchan.spi import ConfigError

Scope = Literal["read", "admin"]

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_ROOT = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True, repr=False)
class Token:
    """A bearer token, as its SHA-256 digest (the token itself is not kept)."""

    scope: Scope
    digest: bytes
    name: str = ""

    def __repr__(self) -> str:
        return f"Token(scope={self.scope!r}, name={self.name!r})"

    @classmethod
    def plain(cls, scope: Scope, token: str, name: str = "") -> Token:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"a {scope} token{' ' + repr(name) if name else ''} is too short: "
                f"use at least {MIN_TOKEN_LENGTH} characters"
            )
        return cls(scope, hashlib.sha256(token.encode()).digest(), name)

    @classmethod
    def hashed(cls, scope: Scope, hex_digest: str, name: str = "") -> Token:
        if not _HEX.match(hex_digest):
            raise ConfigError(
                f"a {scope} token's sha256{' (' + name + ')' if name else ''} is not 64 hex digits"
            )
        return cls(scope, bytes.fromhex(hex_digest), name)

    @classmethod
    def parse(cls, scope: Scope, text: str, name: str = "") -> Token:
        """``sha256:<hex>`` or the token itself."""
        if text.startswith("sha256:"):
            return cls.hashed(scope, text[len("sha256:") :], name)
        return cls.plain(scope, text, name)


def scope_of(tokens: Sequence[Token], presented: str) -> Scope | None:
    """The scope of ``presented`` (the highest if several match), or None.

    Every configured digest is compared, in constant time, whatever matches.
    """
    digest = hashlib.sha256(presented.encode()).digest()
    found: Scope | None = None
    for t in tokens:
        if hmac.compare_digest(t.digest, digest) and found != "admin":
            found = t.scope
    return found


@dataclass
class WebConfig:
    """Settings of :func:`kew.web.create_app` and ``kew serve``."""

    tokens: list[Token] = field(default_factory=list)
    #: Largest request body accepted (413 beyond).
    max_body_bytes: int = 1024 * 1024
    #: Run the app's recorder in the server process (task status reaches the store).
    recorder: bool = True
    #: Run a worker with this many threads in the server process (0: none).
    worker_concurrency: int = 0
    #: A followed output stream ends after this many seconds even if the task runs on.
    follow_timeout: float = 3600.0
    #: A worker counts as seen by /health when its heartbeat is this recent.
    worker_window: float = 30.0
    #: /health reports the broker unavailable when it does not answer within this (s).
    health_timeout: float = 5.0
    #: Hours a monitoring-page login lasts.
    session_hours: float = 12.0
    #: Page title.
    title: str = "kew"
    #: The path the server is reached under behind a reverse proxy (``/kew``; "" for none).
    root_path: str = ""
    #: Seconds between two samples of every queue's depths (kept in memory for the charts).
    sample_seconds: float = 15.0
    #: Hours of queue depth samples kept, and the longest window the charts show.
    history_hours: float = 6.0

    def __post_init__(self) -> None:
        self.root_path = normalize_root(self.root_path)
        if not 0.1 <= self.sample_seconds <= 3600:
            raise ConfigError(
                f"sample_seconds must be between 0.1 and 3600, not {self.sample_seconds}"
            )
        if not 0 < self.history_hours <= 168:
            raise ConfigError(f"history_hours must be in (0, 168], not {self.history_hours}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be positive, not {self.max_body_bytes}")
        if self.worker_concurrency < 0:
            raise ConfigError(
                f"worker_concurrency must be 0 or more, not {self.worker_concurrency}"
            )


def normalize_root(path: str) -> str:
    """A root path as the server uses it: ``""`` or ``/a/b`` (no trailing ``/``)."""
    root = path.strip().rstrip("/")
    if root and not root.startswith("/"):
        root = "/" + root
    if not _ROOT.match(root):
        raise ConfigError(
            f"root_path {path!r} is not a path prefix like /kew (letters, digits, . _ ~ -)"
        )
    return root


class _TokenEntry(msgspec.Struct, forbid_unknown_fields=True):
    scope: Scope
    token: str | None = None
    sha256: str | None = None
    name: str = ""


class _FileConfig(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[_TokenEntry] = []
    max_body_bytes: int = 1024 * 1024
    recorder: bool = True
    worker_concurrency: int = 0
    follow_timeout: float = 3600.0
    worker_window: float = 30.0
    health_timeout: float = 5.0
    session_hours: float = 12.0
    title: str = "kew"
    root_path: str = ""
    sample_seconds: float = 15.0
    history_hours: float = 6.0


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"cannot read the web configuration {str(path)!r}: {e.strerror}"
        ) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = tomllib.loads(text)
    except Exception as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    web = loaded.get("web", loaded)
    if not isinstance(web, dict):
        raise ConfigError(f"{path}: 'web' must be a table")
    return web


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> WebConfig:
    """Read ``path`` (if given) and apply the environment; raises
    :class:`~kew.ConfigError` naming what is wrong."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "web configuration"
    try:
        fc = msgspec.convert(raw, _FileConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{where}: {e}") from None
    tokens: list[Token] = []
    for i, entry in enumerate(fc.tokens):
        name = entry.name or f"tokens[{i}]"
        if (entry.token is None) == (entry.sha256 is None):
            raise ConfigError(f"{where}: {name}: give exactly one of 'token' or 'sha256'")
        if entry.token is not None:
            tokens.append(Token.plain(entry.scope, entry.token, name))
        else:
            assert entry.sha256 is not None
            tokens.append(Token.hashed(entry.scope, entry.sha256, name))
    scopes: tuple[tuple[str, Scope], ...] = (
        ("KEW_WEB_READ_TOKENS", "read"),
        ("KEW_WEB_ADMIN_TOKENS", "admin"),
    )
    for var, scope in scopes:
        for j, item in enumerate(x.strip() for x in env.get(var, "").split(",")):
            if item:
                tokens.append(Token.parse(scope, item, f"{var}[{j}]"))
    max_body = fc.max_body_bytes
    if env.get("KEW_WEB_MAX_BODY_BYTES"):
        try:
            max_body = int(env["KEW_WEB_MAX_BODY_BYTES"])
        except ValueError:
            raise ConfigError(
                f"KEW_WEB_MAX_BODY_BYTES must be an integer, not {env['KEW_WEB_MAX_BODY_BYTES']!r}"
            ) from None
    return WebConfig(
        tokens=tokens,
        max_body_bytes=max_body,
        recorder=fc.recorder,
        worker_concurrency=fc.worker_concurrency,
        follow_timeout=fc.follow_timeout,
        worker_window=fc.worker_window,
        health_timeout=fc.health_timeout,
        session_hours=fc.session_hours,
        title=fc.title,
        root_path=env.get("KEW_WEB_ROOT_PATH", fc.root_path),
        sample_seconds=fc.sample_seconds,
        history_hours=fc.history_hours,
    )
