"""Codecs: typed values to bytes and back, with msgspec.

Decoding validates against the channel's type, so a body that is not a
``T`` is refused with msgspec's exact error (``Expected `int`, got `str` -
at `$.count```), and the message goes to the dead letters with it.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar, cast

import msgspec

from kew.qchan.spi import KewError

T = TypeVar("T")

JSON = "application/json"
MSGPACK = "application/msgpack"


class DecodeError(KewError, ValueError):
    """A body could not be decoded as the channel's type."""


class Codec(Protocol[T]):
    """Turns a queue's values into bodies and back (``Queue(..., codec=...)``).

    ``content_type`` is sent with every body; ``decode`` raises
    :class:`DecodeError` (with the reason) for a body that is not a ``T``.
    """

    content_type: str

    def encode(self, value: T, /) -> bytes:
        """The body for ``value``."""
        ...

    def decode(self, data: bytes, /) -> T:
        """The value of a body; :class:`DecodeError` if it is not a ``T``."""
        ...


def type_name(tp: Any) -> str:
    """A stable, readable name for a type (``module.Qualname`` or its repr)."""
    module = getattr(tp, "__module__", None)
    qualname = getattr(tp, "__qualname__", None)
    if module and qualname and not getattr(tp, "__args__", None):
        return qualname if module == "builtins" else f"{module}.{qualname}"
    return repr(tp).replace("typing.", "")


#: format name -> (content type, msgspec module with Encoder and Decoder)
FORMATS: dict[str, tuple[str, Any]] = {
    "json": (JSON, msgspec.json),
    "msgpack": (MSGPACK, msgspec.msgpack),
}


class MsgspecCodec(Generic[T]):
    """A typed codec in one of msgspec's formats: ``"json"`` (the default,
    readable by any language) or ``"msgpack"`` (smaller and faster,
    binary).  Decoding validates against ``tp`` with msgspec's exact error."""

    def __init__(self, tp: type[T] | Any, format: str = "json") -> None:
        try:
            self.content_type, module = FORMATS[format]
        except KeyError:
            raise ValueError(f"unknown codec {format!r}; known: {', '.join(FORMATS)}") from None
        self.format = format
        self._encoder = module.Encoder()
        self._decoder = module.Decoder(tp)

    def encode(self, value: T, /) -> bytes:
        """The body for ``value`` in this codec's format."""
        return cast(bytes, self._encoder.encode(value))

    def decode(self, data: bytes, /) -> T:
        """The value of a body, validated against the type; :class:`DecodeError` with
        msgspec's message and path if it is not one."""
        try:
            return cast(T, self._decoder.decode(data))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise DecodeError(str(e)) from None


def JsonCodec(tp: type[T] | Any) -> MsgspecCodec[T]:
    """JSON, readable by any language. The default."""
    return MsgspecCodec(tp, "json")


def MsgpackCodec(tp: type[T] | Any) -> MsgspecCodec[T]:
    """MessagePack: smaller and faster, binary."""
    return MsgspecCodec(tp, "msgpack")


def make_codec(tp: type[T] | Any, codec: str | Codec[T] = "json") -> Codec[T]:
    """The codec for ``tp``: a format name (``"json"``, ``"msgpack"``) or a
    codec of the caller's own (anything with ``content_type``, ``encode``
    and ``decode``)."""
    if not isinstance(codec, str):
        return codec
    return MsgspecCodec(tp, codec)
