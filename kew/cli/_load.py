"""``MODULE:APP``: loading the user's :class:`kew.task.App`.

A name that does not resolve (no such module, file or attribute) is one
line.  An error raised by the user's own code while it is imported (a
``KeyError`` from ``os.environ``, a ``NameError``, an import of a package
that is not installed) shows that code's traceback (file and line, without
the import machinery), then the one line; exit code 2 either way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kew.cli._common import fail, one_line
from kew.qchan.spi import KewError

_KEW = str(Path(__file__).resolve().parent.parent)  # the kew package
# kew and its providers (kew_redis, ...), the standard library, site-packages
_LIBRARIES = (_KEW, sys.prefix, sys.base_prefix, "<frozen ")
_IMPORTLIB = os.path.dirname(importlib.__file__) + os.sep


def load_app(spec: str) -> Any:
    """The object ``spec`` (``module:attr`` or ``path.py:attr``) names."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part:  # no colon: the whole thing is the module, attribute "app"
        module_part, attr = spec, "app"
    if not module_part or not attr:
        fail(f"bad MODULE:APP {spec!r}: expected e.g. 'myservice.tasks:app'")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            fail(f"cannot load {spec!r}: no file {module_part}")
        name = f"kew_app_{path.stem}"
        sys.path.insert(0, str(path.resolve().parent))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            fail(f"cannot load {spec!r}: {module_part} is not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        with _import_errors(spec, None):
            loader_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        with _import_errors(spec, module_part):
            module = importlib.import_module(module_part)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            fail(f"cannot load {spec!r}: module {module_part!r} has no attribute {attr!r}")
    if callable(obj) and not hasattr(obj, "queue_names"):
        with _import_errors(spec, None):
            obj = obj()  # an app factory
    if not hasattr(obj, "queue_names") or not hasattr(obj, "connector"):
        fail(f"{spec!r} is a {type(obj).__name__}, not a kew.task.App")
    return obj


@contextmanager
def _import_errors(spec: str, module: str | None) -> Iterator[None]:
    """Errors of importing ``module`` (None: a file, or calling a factory)."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit):
        raise
    except ModuleNotFoundError as e:
        if module is not None and e.name and (module == e.name or module.startswith(e.name + ".")):
            fail(f"cannot load {spec!r}: no module named {e.name!r}")
        _user_error(spec, e)  # the user's code imports something missing
    except KewError as e:
        where = _user_line(e)
        fail(f"cannot load {spec!r}: {one_line(e)}{f' ({where})' if where else ''}")
    except SyntaxError as e:
        fail(f"cannot load {spec!r}: syntax error in {e.filename} line {e.lineno}: {e.msg}")
    except Exception as e:
        _user_error(spec, e)


def _machinery(filename: str) -> bool:
    return filename.startswith(("<frozen importlib", _IMPORTLIB, _KEW + os.sep + "cli" + os.sep))


def _user_error(spec: str, e: BaseException) -> None:
    """The traceback of the user's code (import machinery and the CLI left
    out), then the one line."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _machinery(f.filename)]
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.StackSummary.from_list(frames).format()
    lines += traceback.format_exception_only(type(e), e)
    click.echo("".join(lines).rstrip("\n"), err=True)
    fail(f"cannot load {spec!r}: {type(e).__name__}: {one_line(e)} (traceback above)")


def _user_line(e: BaseException) -> str:
    """``file line N`` of the innermost frame of the user's code (outside
    kew, its providers and the installed libraries), or ''."""
    found = ""
    for f in traceback.extract_tb(e.__traceback__):
        if not f.filename.startswith(_LIBRARIES):
            found = f"{f.filename} line {f.lineno}"
    return found
