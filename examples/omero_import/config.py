"""The service's configuration: one TOML file, with environment overrides.

Every key has a default, so an empty file (or none) is a valid configuration
that runs the real ``omero`` importer on the embedded SQLite broker.  Any
key can be overridden by an environment variable
``KEW_OMERO_<SECTION>_<KEY>`` (``KEW_OMERO_MAIL_PASSWORD``,
``KEW_OMERO_IMPORT_RETRY_MINUTES=1,1,5``, ``KEW_OMERO_KEW_URL=redis://...``);
``KEW_OMERO_CONFIG`` names the file.  Lists are written as JSON arrays or
comma-separated (commands: as a shell would split them); tables as JSON.

A bad configuration stops start-up with a :class:`ConfigError` that names
the key (and the file or the variable it came from) and what is wrong with it.
See ``examples/omero_import/omero-import.toml`` for every key.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

import kew

ENV_PREFIX = "KEW_OMERO_"
ENV_FILE = "KEW_OMERO_CONFIG"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Command = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(min_length=1)]


class ConfigError(kew.ConfigError):
    """The configuration is not usable; the message says which key and why."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class KewSection(_Section):
    url: str | None = None
    """Broker URL; unset: KEW_URL, else the embedded SQLite default."""
    store: str = "sqlite:///kew-tasks.sqlite3"
    """Where task status and output are kept (read by the web front end)."""
    name: str = "omero-import"
    encryption_keys: str | None = None
    """``id:BASE64`` (comma-separated for rotation): the import and keep-alive
    queues are encrypted with it, since they carry OMERO session keys."""
    events_queue: str = "kew.task-events"


class ImportSection(_Section):
    queue: str = "omero.import"
    command: Command = msgspec.field(default_factory=lambda: ["omero", "import"])
    """The importer; the arguments follow it: ``-s HOST -p PORT -k KEY ... PATH``."""
    env: dict[str, str] = {}
    """Extra environment variables of the importer and the session commands."""
    retry_minutes: list[NonNegative] = msgspec.field(
        default_factory=lambda: [10, 10, 120, 1440, 1440, 1440]
    )
    """Smuggler's default intervals between attempts (so at most 7 attempts)."""
    timeout: Seconds | None = None
    """Kill an import (its process group) that runs longer than this; it is retried."""
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    mount_points: dict[str, str] = {}
    """Remote base URI -> local directory: ``"file://scope-3/data/" = "/mnt/scope-3"``."""
    relative_root: str | None = None
    """Relative target paths are taken from here (else the worker's directory)."""
    max_batch: Annotated[int, msgspec.Meta(ge=1)] = 1000


class SessionSection(_Section):
    enabled: bool = True
    queue: str = "omero.keepalive"
    keepalive_command: Command = msgspec.field(
        default_factory=lambda: ["omero", "sessions", "keepalive"]
    )
    close_command: Command = msgspec.field(default_factory=lambda: ["omero", "sessions", "logout"])
    """Both get ``-s HOST -p PORT -k KEY`` appended."""
    interval: Seconds = 300.0
    """Seconds between pings while a batch is not finished."""
    timeout: Seconds = 60.0


class MailSection(_Section):
    enabled: bool = True
    host: str = "localhost"
    port: Port = 25
    security: Literal["none", "starttls", "ssl"] = "none"
    username: str | None = None
    password: str | None = None
    sender: str = "omero-import@localhost"
    admin: str | None = None
    """Where failures go; unset: nobody but the experimenter is told."""
    timeout: Seconds = 30.0
    ca_file: str | None = None
    """PEM file of the CA(s) to trust for the SMTP server's certificate."""
    verify: bool = True
    allow_plain_login: bool = False
    """Log in over ``security = "none"`` (sends the password in clear)."""
    queue: str = "kew.mail"
    retry_minutes: list[NonNegative] = msgspec.field(default_factory=lambda: [1, 5, 30, 120, 720])

    def __repr__(self) -> str:  # never the password
        return f"MailSection(host={self.host!r}, port={self.port}, sender={self.sender!r})"


class WebSection(_Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    base_url: str | None = None
    """How clients reach this server (for the status URIs); default http://host:port."""
    tokens: dict[str, Literal["read", "admin"]] = {}
    """Bearer tokens of the monitoring API and page, with their scope."""


class BatchSection(_Section):
    store: str | None = None
    """URL of the idempotency store of the batch bookkeeping (``sqlite:///path``,
    ``redis://host:port``), shared by every worker; unset: the broker's own
    backend, which SQLite and Redis brokers are (RabbitMQ and STOMP need one)."""
    report_lease: Seconds = 120.0
    """Seconds a dead worker's claim on a batch's e-mails lasts before another
    takes over (a live worker renews its claim while it sends)."""


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kew: KewSection = msgspec.field(default_factory=KewSection)
    import_: ImportSection = msgspec.field(default_factory=ImportSection, name="import")
    session: SessionSection = msgspec.field(default_factory=SessionSection)
    mail: MailSection = msgspec.field(default_factory=MailSection)
    web: WebSection = msgspec.field(default_factory=WebSection)
    batches: BatchSection = msgspec.field(default_factory=BatchSection)

    def __repr__(self) -> str:
        return f"Config(kew={self.kew.url!r}, import_queue={self.import_.queue!r})"


SECTIONS: dict[str, type[_Section]] = {
    "kew": KewSection,
    "import": ImportSection,
    "session": SessionSection,
    "mail": MailSection,
    "web": WebSection,
    "batches": BatchSection,
}


def _env_value(var: str, raw: str, section: str, key: str) -> Any:
    """The text of an override, as the type its key wants."""
    info = msgspec.inspect.type_info(SECTIONS[section])
    assert isinstance(info, msgspec.inspect.StructType)
    field = next((f for f in info.fields if f.name == key), None)
    if field is None:
        known = ", ".join(f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}" for f in info.fields)
        raise ConfigError(f"{var}: no such setting [{section}] {key} (known: {known})")
    tp = field.type
    while isinstance(tp, msgspec.inspect.Metadata):
        tp = tp.type
    if isinstance(tp, msgspec.inspect.UnionType) and raw.strip().lower() in ("", "none", "null"):
        return None
    s = raw.strip()
    wants_list = isinstance(tp, msgspec.inspect.ListType)
    wants_dict = isinstance(tp, msgspec.inspect.DictType)
    if (wants_list and s.startswith("[")) or wants_dict:
        try:
            return msgspec.json.decode(s)
        except msgspec.DecodeError as e:
            raise ConfigError(f"{var}: not valid JSON: {e}") from None
    if wants_list:
        if key.endswith("command"):
            try:
                return shlex.split(s)
            except ValueError as e:
                raise ConfigError(f"{var}: cannot split the command: {e}") from None
        return [v.strip() for v in s.split(",") if v.strip()]
    return raw


def _describe(e: msgspec.ValidationError) -> str:
    """msgspec's message, with ``$.import.timeout`` turned into ``import.timeout``."""
    msg = str(e)
    head, sep, path = msg.rpartition(" - at `$")
    if sep:
        return f"{path.rstrip('`').lstrip('.') or '(top)'}: {head}"
    return msg


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read ``path`` (else ``$KEW_OMERO_CONFIG``, else defaults only), apply
    the ``KEW_OMERO_*`` variables of ``env`` (default ``os.environ``), then
    ``overrides`` ({section: {key: value}}, for programs such as the demo)."""
    env = os.environ if env is None else env
    path = path if path is not None else env.get(ENV_FILE) or None
    data: dict[str, Any] = {}
    origin = "the defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {p} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {p}: {e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
    sources: dict[tuple[str, str], str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_FILE:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(
                f"{var}: unknown section; variables are {ENV_PREFIX}<SECTION>_<KEY> with "
                f"SECTION one of {', '.join(s.upper() for s in SECTIONS)}"
            )
        key = rest[len(section) + 1 :]
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        table[key] = _env_value(var, env[var], section, key)
        sources[(section, key)] = var
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        where = _describe(e)
        dotted = where.split(":", 1)[0]
        section, _, key = dotted.partition(".")
        key = key.split(".", 1)[0].split("[", 1)[0]
        from_env = sources.get((section, key))
        src = f"{from_env} (environment)" if from_env else origin
        raise ConfigError(f"bad configuration in {src}: {where}") from None
    check(config)
    return config


def check(config: Config) -> None:
    """Checks that need more than a type: queue names, URLs, mount points."""
    from kew.qchan import check_queue_name

    problems: list[str] = []
    for where, name in (
        ("import.queue", config.import_.queue),
        ("session.queue", config.session.queue),
        ("mail.queue", config.mail.queue),
        ("kew.events_queue", config.kew.events_queue),
    ):
        try:
            check_queue_name(name)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    for remote, local in config.import_.mount_points.items():
        if not remote.startswith("file://") and not remote.startswith("/"):
            problems.append(
                f"import.mount_points: {remote!r} is not a file:// URI or an absolute path"
            )
        if not local.startswith("/"):
            problems.append(f"import.mount_points[{remote!r}]: {local!r} is not an absolute path")
    if config.kew.encryption_keys is not None:
        from kew.qchan.crypto import parse_keys

        try:
            parse_keys(config.kew.encryption_keys)
        except kew.ConfigError as e:
            problems.append(f"kew.encryption_keys: {e}")
    if config.mail.enabled and "@" not in config.mail.sender:
        problems.append(f"mail.sender: not an e-mail address: {config.mail.sender!r}")
    if config.mail.admin is not None and "@" not in config.mail.admin:
        problems.append(f"mail.admin: not an e-mail address: {config.mail.admin!r}")
    if config.kew.url is not None:
        from kew.qchan.spi.urls import redact

        scheme = config.kew.url.partition("://")[0]
        if not config.kew.url.count("://") or scheme not in kew.known_schemes():
            problems.append(
                f"kew.url: {redact(config.kew.url)!r} is not a broker URL "
                f"(schemes: {', '.join(sorted(kew.known_schemes()))})"
            )
    if config.batches.store is not None:
        from kew.qchan.spi.urls import redact

        store = config.batches.store
        scheme = store.partition("://")[0]
        if "://" not in store or scheme not in ("sqlite", "redis", "rediss", "memory"):
            problems.append(
                f"batches.store: {redact(store)!r} is not the URL of an idempotency store "
                "(sqlite:///path, redis://host:port; unset: the broker's own backend)"
            )
    for token, scope in config.web.tokens.items():
        if not token.startswith("sha256:") and len(token) < 16:
            problems.append(f"web.tokens: a {scope} token is too short: use at least 16 characters")
    if config.mail.enabled:
        try:
            smtp_config(config)
        except kew.ConfigError as e:
            problems.append(f"mail: {e}")
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))


def smtp_config(config: Config) -> Any:
    """The kew.task.mail.SmtpConfig of ``[mail]`` (raises kew.ConfigError)."""
    from kew.task.mail import SmtpConfig

    m = config.mail
    return SmtpConfig(
        host=m.host,
        port=m.port,
        security=m.security,
        username=m.username,
        password=m.password,
        sender=m.sender,
        timeout=m.timeout,
        ca_file=m.ca_file,
        verify=m.verify,
        allow_plain_login=m.allow_plain_login,
    )
