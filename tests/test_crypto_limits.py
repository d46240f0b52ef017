"""Encrypted payloads and producer-side limits."""

import base64
import threading

import msgspec
import pytest

import kew
from kew.qchan.crypto import new_key, parse_keys
from kew.qchan.spi import Message
from kew.testing.util import wait_for


class Import(msgspec.Struct):
    session_key: str
    target: str


SECRET = "sess-8f2a-very-secret"


def _url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path}/c.sqlite3"


def test_encrypted_body_is_not_clear_on_the_broker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = f"k1:{new_key()}"
    c = kew.connect(_url(tmp_path))
    q = kew.Queue(c, "imports", Import, encryption_keys=keys)
    q.send(Import(SECRET, "/data/a.tif"))
    raw = c.browser("imports").peek(1)[0]
    assert SECRET.encode() not in raw.body and b"a.tif" not in raw.body
    assert raw.headers["content-type"] == "application/kew-encrypted+json"
    assert SECRET not in repr(q.codec)
    got: list[Import] = []
    with q.sink(got.append):
        wait_for(lambda: got, 10, what="the decrypted message")
    assert got == [Import(SECRET, "/data/a.tif")]


def test_key_rotation_and_tampering(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = new_key(), new_key()
    c = kew.connect(_url(tmp_path))
    kew.Queue(c, "imports", Import, encryption_keys=f"old:{old}").send(Import("a", "1"))
    q = kew.Queue(c, "imports", Import, encryption_keys=f"old:{old},new:{new}")
    q.send(Import("b", "2"))  # encrypted with "new", the last
    body = c.browser("imports").peek(2)[1].body
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    c.producer("imports").send(Message("t", tampered))
    unknown = kew.Queue(c, "other", Import, encryption_keys=f"zzz:{new_key()}")._message(
        Import("c", "3")
    )
    c.producer("imports").send(Message("u", unknown.body))
    got: list[Import] = []
    with q.sink(got.append):
        wait_for(lambda: len(got) == 2 and len(q.dead.list()) == 2, 10, what="2 ok + 2 dead")
    assert got == [Import("a", "1"), Import("b", "2")]
    reasons = {d.id: d.reason for d in q.dead.list()}
    assert "failed authentication" in reasons["t"]
    assert "key 'zzz'" in reasons["u"]


def test_a_body_moved_to_another_queue_does_not_decrypt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = f"k:{new_key()}"
    c = kew.connect(_url(tmp_path))
    body = kew.Queue(c, "a", Import, encryption_keys=keys)._message(Import("s", "t")).body
    with pytest.raises(kew.DecodeError, match="authentication"):
        kew.Queue(c, "b", Import, encryption_keys=keys).codec.decode(body)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no encryption keys"),
        ("nokey", "KEY_ID:BASE64"),
        ("k:!!!", "not valid base64"),
        (f"k:{base64.b64encode(b'short').decode()}", "need 16, 24 or 32"),
    ],
)
def test_bad_key_specs(spec: str, message: str) -> None:
    with pytest.raises(kew.ConfigError, match=message):
        parse_keys(spec)


def test_max_depth_gives_queue_full(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = kew.connect(_url(tmp_path))
    q = kew.Queue(c, "bounded", int, max_depth=3)
    q.send_many([1, 2])
    q.send(3)
    with pytest.raises(kew.QueueFull, match=r"queue 'bounded' is full: 3 messages, limit 3"):
        q.send(4)
    with pytest.raises(kew.QueueFull):
        q.send_many([4, 5])
    done = threading.Event()
    with q.sink(lambda i: done.set() if i == 3 else None):
        wait_for(lambda: q.browser().stats().ready == 0 and done.is_set(), 10, what="drained")
    wait_for(lambda: q.browser().stats().in_flight == 0, 10, what="acks")
    q.send_many([4, 5, 6])  # room again
    assert q.browser().peek() == [4, 5, 6]


def test_max_message_size_on_the_typed_queue(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = kew.connect(f"sqlite:///{tmp_path}/s.sqlite3?max_message_size=100")
    q = kew.Queue(c, "small", str)
    with pytest.raises(kew.MessageTooLarge, match=r"message of 203 bytes .* maximum of 100 bytes"):
        q.send("x" * 201)
    with pytest.raises(kew.MessageTooLarge):
        q.send_many(["ok", "y" * 500])
    assert q.browser().stats().ready == 0  # nothing of the refused batch was sent
