"""Codecs: typed values to bytes and back, with msgspec.

Decoding validates against the channel's type, so a body that is not a
``T`` is refused with msgspec's exact error (``Expected `int`, got `str` -
at `$.count```), and the message goes to the dead letters with it.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import msgspec

from kew.qchan.spi import KewError

T = TypeVar("T")

JSON = "application/json"
MSGPACK = "application/msgpack"


class DecodeError(KewError, ValueError):
    """A body could not be decoded as the channel's type."""


class Codec(Protocol[T]):
    content_type: str

    def encode(self, value: T, /) -> bytes: ...

    def decode(self, data: bytes, /) -> T: ...


def type_name(tp: Any) -> str:
    """A stable, readable name for a type (``module.Qualname`` or its repr)."""
    module = getattr(tp, "__module__", None)
    qualname = getattr(tp, "__qualname__", None)
    if module and qualname and not getattr(tp, "__args__", None):
        return qualname if module == "builtins" else f"{module}.{qualname}"
    return repr(tp).replace("typing.", "")


class JsonCodec(Generic[T]):
    """JSON, readable by any language. The default."""

    content_type = JSON

    def __init__(self, tp: type[T] | Any) -> None:
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(tp)

    def encode(self, value: T, /) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes, /) -> T:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError(str(e)) from None


class MsgpackCodec(Generic[T]):
    """MessagePack: smaller and faster, binary."""

    content_type = MSGPACK

    def __init__(self, tp: type[T] | Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(tp)

    def encode(self, value: T, /) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes, /) -> T:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError(str(e)) from None


CODECS: dict[str, type[JsonCodec[Any]] | type[MsgpackCodec[Any]]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
}


def make_codec(tp: type[T] | Any, codec: str | Codec[T] = "json") -> Codec[T]:
    if not isinstance(codec, str):
        return codec
    try:
        factory = CODECS[codec]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}") from None
    return factory(tp)
