"""Every reason a JSON body does not fit a type, not only the first.

msgspec stops at the first error; a client fixing a request wants them all.
For Struct and dataclass types each field is checked on its own (missing,
unknown, wrong type), then the whole value (for ``__post_init__`` checks).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgspec


class Invalid(Exception):
    """The body does not fit: ``status`` 400 (not JSON) or 422 (wrong shape)."""

    def __init__(self, status: int, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.status = status
        self.reasons = reasons


def _fields(tp: Any) -> tuple[list[tuple[str, Any, bool]], bool] | None:
    """(encoded name, type, required) per field, and whether unknown fields
    are refused; None for types that are not records."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        forbid = bool(tp.__struct_config__.forbid_unknown_fields)
        return [(f.encode_name, f.type, f.required) for f in msgspec.structs.fields(tp)], forbid
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        out = []
        for f in dataclasses.fields(tp):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append((f.name, hints.get(f.name, Any), required))
        return out, False
    return None


def parse(body: bytes, tp: Any) -> Any:
    """Decode ``body`` as JSON of type ``tp``, or raise :class:`Invalid`
    with every reason found."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise Invalid(400, [f"body is not valid JSON: {e}"]) from None
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as first:
        raise Invalid(422, reasons(value, tp) or [str(first)]) from None


def reasons(value: Any, tp: Any) -> list[str]:
    """Every reason ``value`` (decoded JSON) does not convert to ``tp``."""
    info = _fields(tp)
    if info is None or not isinstance(value, dict):
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as e:
            return [str(e)]
        return []
    fields, forbid = info
    out: list[str] = []
    known = {name for name, _, _ in fields}
    for name, ftp, required in fields:
        if name not in value:
            if required:
                out.append(f"Object missing required field `{name}`")
            continue
        try:
            msgspec.convert(value[name], ftp)
        except msgspec.ValidationError as e:
            out.append(_at(str(e), name))
    if forbid:
        out.extend(f"Object contains unknown field `{k}`" for k in value if k not in known)
    if not out:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as e:
            out.append(str(e))
    return out


def _at(message: str, name: str) -> str:
    """Re-root msgspec's ``- at `$...``` path under the field."""
    marker = " - at `$"
    if marker in message:
        head, _, rest = message.partition(marker)
        return f"{head} - at `$.{name}{rest}"
    return f"{message} - at `$.{name}`"
