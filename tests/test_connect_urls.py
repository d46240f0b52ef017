"""kew.connect and broker URL parsing."""

import pytest

import kew
from kew.qchan.spi import ConfigError, ProviderNotFound, ProviderURL
from kew.qchan.spi.urls import redact


def test_unknown_scheme_names_the_known_ones_and_hides_the_password() -> None:
    with pytest.raises(ProviderNotFound) as e:
        kew.connect("nats://user:hunter2@localhost")
    assert "hunter2" not in str(e.value)
    assert "user:***@localhost" in str(e.value)
    for scheme in ("memory", "sqlite", "redis", "amqp", "stomp"):
        assert scheme in str(e.value)


def test_default_url_is_sqlite_in_working_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("KEW_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    c = kew.connect()
    assert c.url == "sqlite:///kew.sqlite3"
    kew.Queue(c, "q", int).send(1)
    assert (tmp_path / "kew.sqlite3").exists()
    monkeypatch.setenv("KEW_URL", "memory://env")
    assert kew.connect().url == "memory://env"


def test_redact() -> None:
    assert redact("amqp://guest:guest@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact("redis://:pw@h/0?password=x&db=1") == "redis://:***@h/0?password=***&db=1"
    assert redact("memory://") == "memory://"


def test_provider_url_parsing() -> None:
    u = ProviderURL.parse("stomp://me:p%40ss@h1:61613,h2,[::1]:1/vh?prefetch=5&tls=yes", ["stomp"])
    assert u.hosts == [("h1", 61613), ("h2", None), ("::1", 1)]
    assert (u.username, u.password, u.path) == ("me", "p@ss", "vh")
    assert u.get_int("prefetch", 1) == 5 and u.get_bool("tls", False) is True
    u.finish()
    assert "p@ss" not in repr(u) and "p%40ss" not in str(u)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis//h", "no '://'"),
        ("amqp://h:99999", "out of range"),
        ("amqp://h:abc", "not a number"),
        ("amqp://h?x=1&x=2", "given twice"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProviderURL.parse(url, ["amqp", "redis"])


def test_option_errors_name_the_option_and_hide_secrets() -> None:
    u = ProviderURL.parse("redis://h?password=sekrit&n=-3&b=maybe", ["redis"])
    with pytest.raises(ConfigError, match=r"n=.-3.*>= 0"):
        u.get_int("n", 1)
    with pytest.raises(ConfigError, match="true or false"):
        u.get_bool("b", True)
    with pytest.raises(ConfigError) as e:
        u.get_int("password", 1)
    assert "sekrit" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown option"):
        ProviderURL.parse("redis://h?bogus=1", ["redis"]).finish()


def test_queue_name_validation() -> None:
    c = kew.connect("memory://names")
    with pytest.raises(ValueError, match="invalid queue name"):
        kew.Queue(c, "has space", int)
    with pytest.raises(ValueError, match="invalid queue name"):
        kew.Queue(c, ".hidden", int)
