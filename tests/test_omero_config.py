"""OMERO import example: configuration file, environment overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.omero_import.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "omero_import" / "omero-import.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "omero-import.toml"
    p.write_text(text)
    return p


def test_defaults_are_smugglers() -> None:
    c = load_config(env={})
    assert c.import_.retry_minutes == [10, 10, 120, 1440, 1440, 1440]
    assert c.import_.command == ["omero", "import"]
    assert c.import_.queue == "omero.import"
    assert c.kew.url is None and c.session.enabled
    assert c.batches.store is None  # the batch bookkeeping goes on the broker's backend


def test_batches_store_url(tmp_path: Path) -> None:
    p = _write(tmp_path, '[batches]\nstore = "redis://127.0.0.1:6379/2"\nreport_lease = 30\n')
    c = load_config(p, env={"KEW_OMERO_BATCHES_STORE": "sqlite:///var/lib/omero/b.sqlite3"})
    assert c.batches.store == "sqlite:///var/lib/omero/b.sqlite3"
    assert c.batches.report_lease == 30


def test_the_shipped_example_file_loads() -> None:
    c = load_config(EXAMPLE, env={})
    assert c.mail.admin and c.import_.mount_points
    assert "password" not in repr(c.mail).lower() or "secret" not in repr(c.mail)


def test_file_then_environment(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """
[import]
command = ["/opt/omero/bin/omero", "import"]
retry_minutes = [1, 2]
mount_points = { "file://scope-3/data/" = "/mnt/s3" }

[mail]
port = 2525
security = "starttls"
username = "omero-import"
admin = "admin@lab.example"
""",
    )
    c = load_config(
        env={
            "KEW_OMERO_CONFIG": str(p),
            "KEW_OMERO_IMPORT_RETRY_MINUTES": "0.5,3",
            "KEW_OMERO_SESSION_KEEPALIVE_COMMAND": "python3 '/a b/fake.py' sessions keepalive",
            "KEW_OMERO_MAIL_PASSWORD": "s3cret",
            "KEW_OMERO_IMPORT_TIMEOUT": "none",
            "KEW_OMERO_SESSION_ENABLED": "false",
        }
    )
    assert c.import_.command == ["/opt/omero/bin/omero", "import"]
    assert c.import_.retry_minutes == [0.5, 3]
    assert c.import_.mount_points == {"file://scope-3/data/": "/mnt/s3"}
    assert c.session.keepalive_command == ["python3", "/a b/fake.py", "sessions", "keepalive"]
    assert c.mail.port == 2525 and c.mail.password == "s3cret"
    assert "s3cret" not in repr(c.mail) and "s3cret" not in repr(c)
    assert c.import_.timeout is None and c.session.enabled is False


@pytest.mark.parametrize(
    ("text", "env", "reason"),
    [
        ('[import]\nretry_minutes = "abc"\n', {}, "import.retry_minutes: Expected `array`"),
        ("[import]\nretry_minutes = [1, -2]\n", {}, "import.retry_minutes[1]: Expected `float` >="),
        ("[mail]\nport = 99999\n", {}, "mail.port: Expected `int` <= 65535"),
        ('[mail]\nsecurity = "tls"\n', {}, "mail.security: Invalid enum value 'tls'"),
        ("[imports]\nx = 1\n", {}, "unknown field `imports`"),
        ("[session]\nintervall = 3\n", {}, "unknown field `intervall`"),
        ("[session]\ninterval = 0\n", {}, "session.interval: Expected `float` > 0"),
        ("[import]\ncommand = []\n", {}, "import.command: Expected `array` of length >= 1"),
        ("[import\n", {}, "is not valid TOML"),
        ('[import]\nqueue = "no spaces"\n', {}, "import.queue: invalid queue name"),
        ('[import]\nmount_points = {"file://h/a" = "rel"}\n', {}, "is not an absolute path"),
        ('[import]\nmount_points = {"http://h/a" = "/x"}\n', {}, "is not a file:// URI"),
        ('[kew]\nencryption_keys = "k1:xx"\n', {}, "kew.encryption_keys: encryption key 'k1'"),
        ('[kew]\nurl = "nope"\n', {}, "kew.url: 'nope' is not a broker URL"),
        ('[mail]\nadmin = "nobody"\n', {}, "mail.admin: not an e-mail address"),
        ('[web]\ntokens = {"short" = "admin"}\n', {}, "web.tokens: a admin token is too short"),
        (
            '[web]\ntokens = {"0123456789abcdefgh" = "root"}\n',
            {},
            "web.tokens[...]: Invalid enum value 'root'",
        ),
        ('[mail]\nusername = "u"\n', {}, "mail: username and password go together"),
        ('[mail]\nsender = "x@y"\nhost = "a b"\n', {}, "mail: host must be a host name"),
        (
            '[batches]\nstore = "omero-batches.sqlite3"\n',
            {},
            "batches.store: 'omero-batches.sqlite3' is not the URL of an idempotency store",
        ),
        (
            "",
            {"KEW_OMERO_BATCHES_STORE": "amqp://u:pw@h/"},
            "batches.store: 'amqp://u:***@h/' is not the URL of an idempotency store",
        ),
        ("", {"KEW_OMERO_MAIL_PORT": "abc"}, "KEW_OMERO_MAIL_PORT (environment): mail.port"),
        ("", {"KEW_OMERO_MAIL_PORTX": "1"}, "KEW_OMERO_MAIL_PORTX: no such setting [mail] portx"),
        ("", {"KEW_OMERO_NOPE": "1"}, "KEW_OMERO_NOPE: unknown section"),
        ("", {"KEW_OMERO_IMPORT_MOUNT_POINTS": "{x"}, "KEW_OMERO_IMPORT_MOUNT_POINTS: not valid"),
    ],
)
def test_bad_configuration_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], reason: str
) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, env=env)
    assert reason in str(e.value), str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"KEW_OMERO_CONFIG": str(tmp_path / "nope.toml")})
