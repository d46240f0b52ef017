"""kew.web's configuration: file, environment, clear errors; tokens kept
only as digests and never shown; the multi-reason body validator."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest

from kew import ConfigError
from kew.web.backend import body_text, mask_secrets
from kew.web.config import Token, load_config, scope_of
from kew.web.validate import Invalid, parse

ADMIN = "admin-secret-token-1234567890"
READ = "read-secret-token-1234567890"


def test_toml_file_with_plain_and_hashed_tokens(tmp_path: Path) -> None:
    digest = hashlib.sha256(READ.encode()).hexdigest()
    f = tmp_path / "web.toml"
    f.write_text(
        f"""
[web]
max_body_bytes = 2048
worker_concurrency = 3
[[web.tokens]]
scope = "admin"
token = "{ADMIN}"
name = "ops"
[[web.tokens]]
scope = "read"
sha256 = "{digest}"
"""
    )
    c = load_config(f, env={})
    assert c.max_body_bytes == 2048
    assert c.worker_concurrency == 3
    assert scope_of(c.tokens, ADMIN) == "admin"
    assert scope_of(c.tokens, READ) == "read"
    assert scope_of(c.tokens, READ + "x") is None
    shown = repr(c) + str(c.tokens)
    assert ADMIN not in shown and READ not in shown and digest not in shown
    assert "ops" in shown


def test_yaml_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "web.yaml"
    f.write_text(f"tokens:\n  - scope: read\n    token: {READ}\nmax_body_bytes: 10\n")
    env = {
        "KEW_WEB_ADMIN_TOKENS": f"{ADMIN}, sha256:{'ab' * 32}",
        "KEW_WEB_MAX_BODY_BYTES": "4096",
    }
    c = load_config(f, env=env)
    assert c.max_body_bytes == 4096  # the environment wins
    assert [t.scope for t in c.tokens] == ["read", "admin", "admin"]
    assert scope_of(c.tokens, ADMIN) == "admin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[web]\nmax_body_byte = 1\n", "unknown field `max_body_byte`"),
        ("[web]\nmax_body_bytes = 'big'\n", "Expected `int`, got `str` - at `$.max_body_bytes`"),
        ("[web]\nmax_body_bytes = 0\n", "max_body_bytes must be positive"),
        ("[[web.tokens]]\nscope = 'root'\ntoken = 'x'\n", "at `$.tokens[0].scope`"),
        ("[[web.tokens]]\nscope = 'read'\n", "give exactly one of 'token' or 'sha256'"),
        ("[[web.tokens]]\nscope = 'read'\ntoken = 'short'\n", "too short"),
        ("[[web.tokens]]\nscope = 'read'\nsha256 = 'abc'\n", "not 64 hex digits"),
        ("[web\n", "not valid toml"),
    ],
)
def test_bad_configuration_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "web.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert expected.lower() in str(e.value).lower()


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="KEW_WEB_MAX_BODY_BYTES"):
        load_config(env={"KEW_WEB_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ConfigError, match=r"KEW_WEB_READ_TOKENS\[0\].*too short") as e:
        load_config(env={"KEW_WEB_READ_TOKENS": "qwertyz"})
    assert "qwertyz" not in str(e.value)  # a token is never echoed


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the web configuration"):
        load_config(tmp_path / "nope.toml", env={})


def test_token_repr_never_shows_the_token() -> None:
    t = Token.plain("admin", ADMIN, "ci")
    assert ADMIN not in repr(t) and t.digest.hex() not in repr(t)


class Thing(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: list[str] = []


def test_every_reason_is_reported() -> None:
    with pytest.raises(Invalid) as e:
        parse(b'{"b": [1, "x", 2], "c": 0}', Thing)
    assert e.value.status == 422
    assert e.value.reasons == [
        "Object missing required field `a`",
        "Expected `str`, got `int` - at `$.b[0]`",
        "Object contains unknown field `c`",
    ]
    with pytest.raises(Invalid) as e:
        parse(b'{"a": ', Thing)
    assert e.value.status == 400
    assert parse(b'{"a": 1}', Thing) == Thing(1)


def test_secret_looking_fields_are_masked() -> None:
    doc = {"sessionKey": "k1", "nested": [{"password": "p", "name": "n"}], "api_key": "z"}
    assert mask_secrets(doc) == {
        "sessionKey": "***",
        "nested": [{"password": "***", "name": "n"}],
        "api_key": "***",
    }
    text, b64 = body_text(b'{"token": "t0ps3cret", "id": 1}')
    assert "t0ps3cret" not in text and not b64
    assert body_text(b"\xff\xfe") == ("//4=", True)
