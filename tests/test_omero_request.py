"""OMERO import example: request validation, command lines, path translation."""

from __future__ import annotations

import json

import msgspec
import pytest

from examples.omero_import.command import import_argv, local_path, redacted
from examples.omero_import.request import ImportTask, InvalidRequest, parse_batch, with_batch


def _body(*items: object) -> bytes:
    return json.dumps(list(items)).encode()


GOOD = {
    "experimenterEmail": "ann@lab.example",
    "targetUri": "file://scope-3/data/plate1",
    "omeroHost": "omero.example",
    "sessionKey": "c7e7f3d1-secret",
}


def test_smuggler_string_fields_are_accepted() -> None:
    """Smuggler clients send every value as a string, and relative paths."""
    (t,) = parse_batch(
        _body(
            {
                "experimenterEmail": "ann@lab.example",
                "targetUri": "acq/run-7/img.tif",
                "omeroHost": "omero.example",
                "omeroPort": "4065",
                "sessionKey": "k-1",
                "name": "run 7",
                "description": "",
                "datasetId": "12",
                "screenId": "",
                "textAnnotations": [["ns/a", "first"], ["ns/b", "second"]],
                "annotationIds": ["3", 4],
            }
        )
    )
    assert t.omero_port == 4065
    assert t.dataset_id == 12 and t.screen_id is None
    assert t.description is None  # "" means absent
    assert t.target_uri == "acq/run-7/img.tif"
    assert t.text_annotations == [("ns/a", "first"), ("ns/b", "second")]
    assert t.annotation_ids == [3, 4]
    # stringified lists too
    (u,) = parse_batch(_body({**GOOD, "annotationIds": "[5, 6]", "textAnnotations": "[]"}))
    assert u.annotation_ids == [5, 6] and u.text_annotations == []


def test_defaults_and_wire_format() -> None:
    (t,) = with_batch(parse_batch(_body(GOOD)), "b1")
    assert t.omero_port == 4064 and t.batch_id == "b1" and t.batch_size == 1
    wire = msgspec.json.decode(msgspec.json.encode(t))
    assert wire["targetUri"] == GOOD["targetUri"] and wire["batchId"] == "b1"
    assert msgspec.json.decode(msgspec.json.encode(t), type=ImportTask) == t
    assert "secret" not in repr(t) and "secret" not in str(t)


def test_every_reason_is_reported() -> None:
    bad = [
        {
            "experimenterEmail": "not-an-address",
            "targetUri": "http://elsewhere/x.tif",
            "omeroPort": "port",
            "datasetId": "1",
            "screenId": "2",
            "textAnnotations": [["only-ns"]],
            "annotationIds": ["0", "x"],
            "datasetID": "7",
        },
        {**GOOD, "omeroPort": 70000},
        {**GOOD},
        "a string",
    ]
    with pytest.raises(InvalidRequest) as e:
        parse_batch(json.dumps(bad).encode())
    errors = e.value.errors
    expected = [
        "[0].datasetID: unknown field",
        "[0].omeroHost: required",
        "[0].sessionKey: required",
        "[0].experimenterEmail: not an e-mail address",
        "[0].targetUri: unsupported URI scheme 'http'",
        "[0].omeroPort: expected a whole number",
        "[0]: give datasetId or screenId, not both",
        "[0].textAnnotations[0]: expected a [namespace, text] pair",
        "[0].annotationIds[0]: must be greater than 0",
        "[0].annotationIds[1]: expected a whole number",
        "[1].omeroPort: must be between 1 and 65535",
        "[3]: expected an import request object",
    ]
    for reason in expected:
        assert any(err.startswith(reason) for err in errors), (reason, errors)
    assert len(errors) == len(expected), errors  # element [2] is fine


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "the body is not JSON"),
        (b"{", "the body is not JSON"),
        (b"[]", "the array is empty"),
        (json.dumps(GOOD).encode(), "got one object"),
        (b"42", "expected a JSON array"),
        (_body({**GOOD, "datasetId": -3}), "[0].datasetId: must be greater than 0"),
        (_body({**GOOD, "screenId": "1.5"}), "[0].screenId: expected a whole number"),
        (_body({**GOOD, "targetUri": "-rf"}), "[0].targetUri: must not start with '-'"),
        (_body({**GOOD, "sessionKey": 5}), "[0].sessionKey: expected a string"),
        (_body({**GOOD, "textAnnotations": [["ns", " "]]}), "[0].textAnnotations[0]: the text"),
        (_body({**GOOD, "omeroHost": "a b"}), "[0].omeroHost: not a host name"),
    ],
)
def test_single_reasons(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_batch(body)
    assert any(reason in err for err in e.value.errors), e.value.errors


def test_dataset_or_screen_or_neither() -> None:
    (d,) = parse_batch(_body({**GOOD, "datasetId": 5}))
    (s,) = parse_batch(_body({**GOOD, "screenId": 6}))
    (n,) = parse_batch(_body(GOOD))  # orphaned import, as Smuggler allowed
    assert (d.dataset_id, d.screen_id, s.dataset_id, s.screen_id) == (5, None, None, 6)
    assert (n.dataset_id, n.screen_id) == (None, None)


def test_importer_command_line() -> None:
    (t,) = parse_batch(
        _body(
            {
                **GOOD,
                "omeroPort": "4065",
                "name": "plate 1",
                "description": "two words",
                "screenId": "9",
                "textAnnotations": [["ns/a", "x y"], ["ns/b", "z"]],
                "annotationIds": [3, 4],
            }
        )
    )
    argv = import_argv(["omero", "import"], t, "/mnt/s3/plate1")
    assert argv == [
        "omero", "import", "-s", "omero.example", "-p", "4065", "-k", "c7e7f3d1-secret",
        "-n", "plate 1", "-x", "two words", "-r", "9",
        "--annotation-ns", "ns/a", "--annotation-text", "x y",
        "--annotation-ns", "ns/b", "--annotation-text", "z",
        "--annotation-link", "3", "--annotation-link", "4",
        "/mnt/s3/plate1",
    ]  # fmt: skip
    assert "c7e7f3d1-secret" not in redacted(argv)
    (m,) = parse_batch(_body({**GOOD, "datasetId": 2}))
    assert import_argv(["imp"], m, "/p") == [
        "imp", "-s", "omero.example", "-p", "4064", "-k", "c7e7f3d1-secret", "-d", "2", "/p"
    ]  # fmt: skip


def test_mount_point_translation() -> None:
    mounts = {
        "file://scope-3/data/": "/mnt/s3",
        "file://scope-3/data/deep": "/mnt/deep",
        "/Volumes/acq": "/data/acq",
    }
    cases = {
        "file://scope-3/data/a/b.tif": "/mnt/s3/a/b.tif",
        "file://SCOPE-3/data/deep/x": "/mnt/deep/x",  # longest base wins; host case-blind
        "file://scope-3/dataxx/a": "/dataxx/a",  # not under file://scope-3/data
        "file:///abs/x%20y.tif": "/abs/x y.tif",
        "/Volumes/acq/y/z.tif": "/data/acq/y/z.tif",
        "/Volumes/acquired/z.tif": "/Volumes/acquired/z.tif",
        "rel/p.tif": "/srv/imports/rel/p.tif",
    }
    for uri, want in cases.items():
        assert local_path(uri, mounts, "/srv/imports") == want, uri
    assert local_path("rel/p.tif", {}, None) == "rel/p.tif"
