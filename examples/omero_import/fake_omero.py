#!/usr/bin/env python3
"""A stand-in for the ``omero`` command line, for the demo and the tests.

    fake_omero.py import -s HOST -p PORT -k KEY [...] PATH
    fake_omero.py sessions keepalive -s HOST -p PORT -k KEY
    fake_omero.py sessions logout -s HOST -p PORT -k KEY

It appends its argv as one JSON line to ``$FAKE_OMERO_LOG`` (when set), prints
importer-like output (never the session key), and fails as its target asks:
a path containing ``fail-once`` fails its first attempt (attempts are counted
in ``$FAKE_OMERO_STATE``, default: next to the log) and succeeds after;
``fail-always`` always fails (exit 1); ``hang`` sleeps for an hour.
``$FAKE_OMERO_DELAY`` (seconds, default 0.05) paces the output lines.
Standard library only, so it runs under any Python 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import datetime


def _record(argv: list[str]) -> None:
    log = os.environ.get("FAKE_OMERO_LOG")
    if not log:
        return
    line = json.dumps({"argv": argv, "pid": os.getpid(), "at": time.time()}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)


def _attempt(target: str) -> int:
    """How many times this target was imported, this time included."""
    state = os.environ.get("FAKE_OMERO_STATE") or os.path.dirname(
        os.path.abspath(os.environ.get("FAKE_OMERO_LOG") or ".")
    )
    os.makedirs(state, exist_ok=True)
    path = os.path.join(state, "attempts-" + hashlib.sha1(target.encode()).hexdigest()[:16])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return os.path.getsize(path)


def _say(level: str, logger: str, text: str) -> None:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"{stamp} {level:<5} [{logger:>40}] {text}", flush=True)
    time.sleep(float(os.environ.get("FAKE_OMERO_DELAY", "0.05")))


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def do_import(args: list[str]) -> int:
    if not args or args[-1].startswith("-"):
        print("error: no file to import", file=sys.stderr)
        return 2
    target = args[-1]
    host, port = _option(args, "-s"), _option(args, "-p") or "4064"
    if not host or not _option(args, "-k"):
        print("error: -s HOST and -k KEY are required", file=sys.stderr)
        return 2
    attempt = _attempt(target)
    _say("INFO", "ome.formats.importer.ImportConfig", "OMERO Version: 5.6.x (stand-in importer)")
    _say("INFO", "ome.formats.OMEROMetadataStoreClient", f"Attempting login to {host}:{port}")
    _say("INFO", "ormats.importer.cli.CommandLineImporter", f"Setting up import of {target}")
    if "hang" in target:
        time.sleep(3600)
    name = os.path.basename(target.rstrip("/"))
    if "fail-always" in name or ("fail-once" in name and attempt == 1):
        _say("ERROR", "ome.formats.importer.cli.ErrorHandler", f"FILE_EXCEPTION: {target}")
        print(
            f"omero.ServerError: stand-in failure importing {target} (attempt {attempt})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    _say("INFO", "ome.formats.importer.ImportLibrary", "FILESET_UPLOAD_START")
    _say("INFO", "ome.formats.importer.ImportLibrary", "FILESET_UPLOAD_END")
    _say("INFO", "ome.formats.importer.ImportLibrary", f"IMPORT_DONE Imported file: {target}")
    image = int(hashlib.sha1(target.encode()).hexdigest()[:6], 16)
    print("Other imported objects:\nFileset:1\n", flush=True)
    print(f"Image:{image}", flush=True)
    return 0


def do_sessions(args: list[str]) -> int:
    if not args or args[0] not in ("keepalive", "logout", "close"):
        print("error: sessions keepalive|logout -s HOST -k KEY", file=sys.stderr)
        return 2
    host = _option(args, "-s")
    if not host or not _option(args, "-k"):
        print("error: -s HOST and -k KEY are required", file=sys.stderr)
        return 2
    verb = "kept alive" if args[0] == "keepalive" else "closed"
    print(f"session on {host} {verb}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    _record(argv)
    if argv[:1] == ["import"]:
        return do_import(argv[1:])
    if argv[:1] == ["sessions"]:
        return do_sessions(argv[1:])
    print(f"usage: {os.path.basename(sys.argv[0])} import|sessions ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
