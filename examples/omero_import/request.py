"""Import requests: what a client POSTs to ``/ome/import``, and the task message.

A request body is a JSON array of objects with Smuggler's field names
(``experimenterEmail``, ``targetUri``, ``omeroHost``, ``omeroPort``,
``sessionKey``, ``name``, ``description``, ``datasetId``, ``screenId``,
``textAnnotations``, ``annotationIds``).  Smuggler's clients send every
value as a JSON string (``"omeroPort": "4064"``, ``"datasetId": "12"``) and
may send a relative local path as ``targetUri``; both are accepted.

:func:`parse_batch` checks every field of every element and reports *every*
problem at once (``InvalidRequest.errors``), so a client fixes its request in
one round, not one error at a time.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import msgspec

DEFAULT_OMERO_PORT = 4064
MAX_BATCH = 1000


class ImportTask(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """One import: the message on the import queue (plain JSON, Smuggler's
    field names), plus the batch it belongs to.

    ``session_key`` is a secret: the import queue is encrypted when the
    service has an encryption key, and nothing prints it.
    """

    experimenter_email: str
    target_uri: str
    omero_host: str
    session_key: str
    omero_port: int = DEFAULT_OMERO_PORT
    name: str | None = None
    description: str | None = None
    dataset_id: int | None = None
    screen_id: int | None = None
    text_annotations: list[tuple[str, str]] = []
    annotation_ids: list[int] = []
    batch_id: str = ""
    batch_size: int = 1

    def __repr__(self) -> str:  # never the session key
        return (
            f"ImportTask(target_uri={self.target_uri!r}, omero={self.omero_host}:"
            f"{self.omero_port}, experimenter={self.experimenter_email!r}, "
            f"batch={self.batch_id!r}, session_key=<hidden>)"
        )

    __str__ = __repr__


class InvalidRequest(ValueError):
    """A request body that cannot be queued; ``errors`` lists every reason."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


# request field -> ImportTask attribute
FIELDS: dict[str, str] = {
    "experimenterEmail": "experimenter_email",
    "targetUri": "target_uri",
    "omeroHost": "omero_host",
    "omeroPort": "omero_port",
    "sessionKey": "session_key",
    "name": "name",
    "description": "description",
    "datasetId": "dataset_id",
    "screenId": "screen_id",
    "textAnnotations": "text_annotations",
    "annotationIds": "annotation_ids",
}
REQUIRED = ("experimenterEmail", "targetUri", "omeroHost", "sessionKey")

_EMAIL = re.compile(r"^[^@\s,;<>\"]+@[^@\s,;<>\"]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}$")


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(where: str, value: Any, errors: list[str]) -> str | None:
    if not isinstance(value, str):
        errors.append(f"{where}: expected a string, got {_kind(value)}")
        return None
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _positive_int(where: str, value: Any, errors: list[str], *, limit: int | None = None) -> int:
    """An integer > 0 (or in 1..limit) from a number or a numeric string."""
    try:
        if isinstance(value, bool):
            raise msgspec.ValidationError
        n = msgspec.convert(value.strip() if isinstance(value, str) else value, int, strict=False)
    except msgspec.ValidationError:
        errors.append(f"{where}: expected a whole number, got {_kind(value)}")
        return 0
    if n <= 0 or (limit is not None and n > limit):
        bound = f"between 1 and {limit}" if limit else "greater than 0"
        errors.append(f"{where}: must be {bound}, got {n}")
        return 0
    return n


def _list(where: str, value: Any, errors: list[str]) -> list[Any]:
    """A JSON array, or a string holding one (Smuggler clients stringify)."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        if s.startswith("["):
            try:
                value = msgspec.json.decode(s)
            except msgspec.DecodeError:
                errors.append(f"{where}: the string is not a JSON array")
                return []
        else:
            value = [v.strip() for v in s.split(",")]  # "1,2,3"
    if not isinstance(value, list):
        errors.append(f"{where}: expected an array, got {_kind(value)}")
        return []
    return value


def check_target(where: str, value: str, errors: list[str]) -> None:
    """``file://`` URIs, absolute and relative local paths; nothing else."""
    if "\x00" in value:
        errors.append(f"{where}: contains a NUL character")
        return
    v = value.strip()
    if v.startswith("-"):
        errors.append(f"{where}: must not start with '-' (it would read as an importer option)")
        return
    scheme = urlsplit(v).scheme
    if scheme and scheme.lower() != "file" and len(scheme) > 1:  # 1 letter: C:\ on Windows
        errors.append(
            f"{where}: unsupported URI scheme {scheme!r}; give a file:// URI or a local path"
        )
        return
    if scheme.lower() == "file" and not urlsplit(v).path.strip("/"):
        errors.append(f"{where}: the file URI has no path")


def _element(i: int, item: Any, errors: list[str]) -> dict[str, Any] | None:
    at = f"[{i}]"
    if not isinstance(item, dict):
        errors.append(f"{at}: expected an import request object, got {_kind(item)}")
        return None
    before = len(errors)
    out: dict[str, Any] = {}
    for key in item:
        if key not in FIELDS:
            known = ", ".join(FIELDS)
            errors.append(f"{at}.{key}: unknown field (known: {known})")
    for key in REQUIRED:
        if _absent(item.get(key)):
            errors.append(f"{at}.{key}: required")
    for key in ("experimenterEmail", "targetUri", "omeroHost", "sessionKey"):
        v = item.get(key)
        if _absent(v):
            continue
        s = _text(f"{at}.{key}", v, errors)
        if s is None:
            continue
        s = s.strip()
        if key == "experimenterEmail" and not _EMAIL.match(s):
            errors.append(f"{at}.{key}: not an e-mail address: {s!r}")
        elif key == "omeroHost" and not _HOST.match(s):
            errors.append(f"{at}.{key}: not a host name: {s!r}")
        elif key == "targetUri":
            check_target(f"{at}.{key}", s, errors)
        elif key == "sessionKey" and any(c.isspace() for c in s):
            errors.append(f"{at}.{key}: must not contain white space")
        out[FIELDS[key]] = s
    port = item.get("omeroPort")
    if not _absent(port):
        out["omero_port"] = _positive_int(f"{at}.omeroPort", port, errors, limit=65535)
    for key in ("name", "description"):
        v = item.get(key)
        if v is not None:
            s = _text(f"{at}.{key}", v, errors)
            if s is not None and s.strip():
                out[FIELDS[key]] = s
    for key in ("datasetId", "screenId"):
        v = item.get(key)
        if not _absent(v):
            out[FIELDS[key]] = _positive_int(f"{at}.{key}", v, errors)
    if not _absent(item.get("datasetId")) and not _absent(item.get("screenId")):
        errors.append(f"{at}: give datasetId or screenId, not both")
    anns: list[tuple[str, str]] = []
    for j, pair in enumerate(_list(f"{at}.textAnnotations", item.get("textAnnotations"), errors)):
        w = f"{at}.textAnnotations[{j}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            errors.append(f"{w}: expected a [namespace, text] pair, got {_kind(pair)}")
            continue
        ns, text = pair
        if not isinstance(ns, str) or not isinstance(text, str):
            errors.append(f"{w}: namespace and text must be strings")
        elif not text.strip():
            errors.append(f"{w}: the text is empty")
        else:
            anns.append((ns, text))
    if anns:
        out["text_annotations"] = anns
    ids = [
        _positive_int(f"{at}.annotationIds[{j}]", v, errors)
        for j, v in enumerate(_list(f"{at}.annotationIds", item.get("annotationIds"), errors))
    ]
    if ids:
        out["annotation_ids"] = ids
    return out if len(errors) == before else None


def parse_batch(body: bytes | str, *, max_batch: int = MAX_BATCH) -> list[ImportTask]:
    """Validate a POSTed body; the imports it asks for (without batch ids).

    Raises :class:`InvalidRequest` with every reason found.
    """
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise InvalidRequest([f"the body is not JSON: {e}"]) from None
    if isinstance(data, dict):
        raise InvalidRequest(["expected a JSON array of import requests, got one object"])
    if not isinstance(data, list):
        raise InvalidRequest([f"expected a JSON array of import requests, got {_kind(data)}"])
    if not data:
        raise InvalidRequest(["the array is empty: nothing to import"])
    if len(data) > max_batch:
        raise InvalidRequest([f"too many imports in one request: {len(data)} > {max_batch}"])
    errors: list[str] = []
    fields = [_element(i, item, errors) for i, item in enumerate(data)]
    if errors:
        raise InvalidRequest(errors)
    return [ImportTask(**f) for f in fields if f is not None]


def with_batch(tasks: list[ImportTask], batch_id: str) -> list[ImportTask]:
    return [msgspec.structs.replace(t, batch_id=batch_id, batch_size=len(tasks)) for t in tasks]
