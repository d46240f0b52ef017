"""The importer's command line, and remote-to-local path translation.

``omero import -s HOST -p PORT -k KEY [-n NAME] [-x DESC] [-d DATASET | -r SCREEN]
[--annotation-ns NS --annotation-text TEXT]... [--annotation-link ID]... PATH``
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlsplit

from .request import ImportTask


def _file_uri_parts(uri: str) -> tuple[str, str] | None:
    """(host, path) of a ``file://`` URI, else None."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        return None
    return parts.netloc.lower(), unquote(parts.path)


def local_path(
    target_uri: str, mount_points: Mapping[str, str], relative_root: str | None = None
) -> str:
    """Where the importer finds ``target_uri`` on this machine.

    A mount point maps a remote base (``file://scope-3/data/`` or a path as
    the client sees it, ``/Volumes/data``) to a local directory
    (``/mnt/scope-3``): a target under the base is rebased there, on whole
    path segments (``file://scope-3/dataxxx`` is not under
    ``file://scope-3/data``), the longest base winning.  Other ``file://``
    URIs give their path; a relative path is taken from ``relative_root``.
    """
    target = target_uri.strip()
    t_uri = _file_uri_parts(target)
    best: tuple[int, str] | None = None
    for remote, local in mount_points.items():
        r_uri = _file_uri_parts(remote)
        if r_uri is not None and t_uri is not None:
            if r_uri[0] != t_uri[0]:
                continue
            base, path = r_uri[1], t_uri[1]
        elif r_uri is None and t_uri is None:
            base, path = remote, target
        else:
            continue
        base = base.rstrip("/")
        if path == base or path.startswith(base + "/"):
            rest = path[len(base) :].lstrip("/")
            candidate = os.path.join(local, rest) if rest else local
            if best is None or len(base) > best[0]:
                best = (len(base), candidate)
    if best is not None:
        return best[1]
    path = t_uri[1] if t_uri is not None else target
    if not os.path.isabs(path) and relative_root:
        return os.path.join(relative_root, path)
    return path


def session_args(host: str, port: int, key: str) -> list[str]:
    return ["-s", host, "-p", str(port), "-k", key]


def import_argv(command: Sequence[str], task: ImportTask, path: str) -> list[str]:
    """The importer's argv for ``task``, importing ``path``."""
    argv = [*command, *session_args(task.omero_host, task.omero_port, task.session_key)]
    if task.name:
        argv += ["-n", task.name]
    if task.description:
        argv += ["-x", task.description]
    if task.dataset_id:
        argv += ["-d", str(task.dataset_id)]
    elif task.screen_id:
        argv += ["-r", str(task.screen_id)]
    for ns, text in task.text_annotations:
        argv += ["--annotation-ns", ns, "--annotation-text", text]
    for ann_id in task.annotation_ids:
        argv += ["--annotation-link", str(ann_id)]
    argv.append(path)
    return argv


def redacted(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value after each ``-k`` hidden, for logs."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] in ("-k", "--key"):
            out[i + 1] = "****"
    return out
