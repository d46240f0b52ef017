"""Encrypted payloads: a codec wrapper with AES-GCM and key rotation.

Sensitive messages (an OMERO session key, say) are then never stored in
clear on a broker.  The body is ``b"kew1" | key-id length (1 byte) | key id |
12-byte nonce | AES-GCM ciphertext+tag`` of what the inner codec made; the
queue name and message type are bound in as associated data, so a body
moved to another queue does not decrypt.  Rotation: encrypt with the newest
key, decrypt with any key still listed by its id.  A body that was tampered
with, or whose key is unknown, fails to decode and is dead-lettered with the
reason.  Needs the ``crypto`` extra (``cryptography``).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Generic, TypeVar

from kew.qchan.codec import Codec, DecodeError
from kew.qchan.spi import ConfigError

T = TypeVar("T")

MAGIC = b"kew1"


def parse_keys(spec: str) -> dict[str, bytes]:
    """Keys from ``"id1:BASE64KEY,id2:BASE64KEY"`` (e.g. an env variable).

    Each key is 16, 24 or 32 bytes (AES-128/192/256), base64-encoded.
    """
    keys: dict[str, bytes] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key_id, sep, b64 = item.partition(":")
        if not sep or not key_id:
            raise ConfigError("an encryption key is written as KEY_ID:BASE64, e.g. k1:...")
        try:
            key = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ConfigError(f"encryption key {key_id!r} is not valid base64") from None
        if len(key) not in (16, 24, 32):
            raise ConfigError(f"encryption key {key_id!r} has {len(key)} bytes; need 16, 24 or 32")
        keys[key_id] = key
    if not keys:
        raise ConfigError("no encryption keys given")
    return keys


def new_key() -> str:
    """A fresh random AES-256 key, base64-encoded."""
    return base64.b64encode(os.urandom(32)).decode()


class EncryptedCodec(Generic[T]):
    """Wraps a codec: what it encodes is encrypted, what it decodes verified.

    ``keys`` maps key ids to 16, 24 or 32-byte AES keys (or is a string for
    :func:`parse_keys`); ``current`` is the id to encrypt with (default: the
    last key).  ``context`` is bound into every body as associated data (a
    queue passes its name and type), so a body does not decrypt elsewhere.
    Needs the ``crypto`` extra; :class:`~kew.ConfigError` for bad keys.
    """

    def __init__(
        self,
        inner: Codec[T],
        keys: Mapping[str, bytes] | str,
        *,
        current: str | None = None,
        context: str = "",
    ) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "encrypted payloads need the cryptography package: pip install 'ome-kew[crypto]'"
            ) from None
        table = parse_keys(keys) if isinstance(keys, str) else dict(keys)
        if not table:
            raise ConfigError("no encryption keys given")
        self._current = current or list(table)[-1]
        if self._current not in table:
            raise ConfigError(f"the current key id {self._current!r} is not among the keys")
        if len(self._current.encode()) > 255:
            raise ConfigError("a key id must be at most 255 bytes")
        self._aead = {kid: AESGCM(key) for kid, key in table.items()}
        self._inner = inner
        self._aad = f"{context}|{inner.content_type}".encode()
        self.content_type = f"application/kew-encrypted+{inner.content_type.split('/')[-1]}"

    def __repr__(self) -> str:  # never the keys
        return f"EncryptedCodec(key ids={sorted(self._aead)}, current={self._current!r})"

    def encode(self, value: T, /) -> bytes:
        """What the inner codec makes of ``value``, encrypted with the current key."""
        kid = self._current.encode()
        nonce = os.urandom(12)
        sealed = self._aead[self._current].encrypt(nonce, self._inner.encode(value), self._aad)
        return b"".join((MAGIC, bytes((len(kid),)), kid, nonce, sealed))

    def decode(self, data: bytes, /) -> T:
        """Verify and decrypt with the key the body names, then decode with the inner codec;
        :class:`~kew.DecodeError` if the body is not encrypted, its key is unknown, or it
        fails authentication."""
        from cryptography.exceptions import InvalidTag

        if not data.startswith(MAGIC) or len(data) < 6:
            raise DecodeError("not an encrypted kew body")
        n = data[4]
        kid = data[5 : 5 + n].decode(errors="replace")
        nonce, sealed = data[5 + n : 17 + n], data[17 + n :]
        aead = self._aead.get(kid)
        if aead is None:
            raise DecodeError(f"encrypted with key {kid!r}, which this consumer does not have")
        try:
            plain = aead.decrypt(nonce, sealed, self._aad)
        except InvalidTag:
            raise DecodeError(
                "the encrypted body failed authentication (tampered or wrong key)"
            ) from None
        return self._inner.decode(plain)
