"""The documentation works: the API reference builds without a warning, every
public object of ``kew`` and ``kew.task`` has a docstring, and the getting-started
guide runs as written (the "first hour as a user" issue)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from kew.testing.util import require

ROOT = Path(__file__).resolve().parent.parent
GETTING_STARTED = ROOT / "docs" / "getting-started.md"

# The modules whose public names (``__all__``, and the public methods and properties of
# their classes) must all have a docstring.
DOCUMENTED_MODULES = ("kew", "kew.task")

# documented by the lead in the same change
ALLOWED_UNDOCUMENTED = frozenset(
    {
        "kew.task.Worker",  # kew/task/worker.py
    }
)


# -- every public object has a docstring ------------------------------------------------


def _attribute_docstring(module: str, name: str) -> tuple[str, str | None]:
    """Where the module-level assignment of ``name`` is (following ``from X import name``)
    and the string literal right after it (an attribute docstring, as the reference
    shows it); a ``#:`` comment is not one."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    body = ast.parse(Path(spec.origin).read_text()).body
    for i, node in enumerate(body):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any(a.name == name and a.asname in (None, name) for a in node.names):
                return _attribute_docstring(node.module, name)
            continue
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return module, after.value.value
            return module, None
    raise AssertionError(f"no assignment of {name} found from {module}")


def _own_doc(obj: object) -> str:
    """``obj``'s docstring, not one Python made up for it (a dataclass's signature)."""
    doc = getattr(obj, "__doc__", None) or ""
    made_up = inspect.isclass(obj) and dataclasses.is_dataclass(obj)
    if made_up and doc.startswith(getattr(obj, "__name__", "") + "("):
        return ""
    return doc.strip()


def public_objects() -> Iterator[tuple[str, str, bool]]:
    """``(dotted name, defining module, documented)`` for every public object of
    :data:`DOCUMENTED_MODULES`: the names in ``__all__``, and the public methods and
    properties of those that are classes (inherited ones from kew's own bases too; a
    method documented on the base it overrides counts as documented, as in ``help()``)."""
    for module_name in DOCUMENTED_MODULES:
        module: ModuleType = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            dotted = f"{module_name}.{name}"
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                where, doc = _attribute_docstring(module_name, name)
                yield dotted, where, bool(doc and doc.strip())
                continue
            yield dotted, obj.__module__, bool(_own_doc(obj))
            if not inspect.isclass(obj):
                continue
            seen: set[str] = set()
            for klass in obj.__mro__:
                if not klass.__module__.startswith("kew"):
                    continue
                for attr, value in vars(klass).items():
                    if attr.startswith("_") or attr in seen:
                        continue
                    if isinstance(value, (staticmethod, classmethod)):
                        value = value.__func__
                    if not (inspect.isfunction(value) or isinstance(value, property)):
                        continue
                    seen.add(attr)
                    doc = inspect.getdoc(value)  # its own, else the one it overrides
                    yield f"{dotted}.{attr}", klass.__module__, bool(doc)


def test_every_public_object_has_a_docstring() -> None:
    objects = list(public_objects())
    names = {name for name, _, _ in objects}
    assert len(objects) > 100, "the walk found too little: is __all__ still read?"
    stale = sorted(ALLOWED_UNDOCUMENTED - names)
    assert not stale, f"ALLOWED_UNDOCUMENTED names objects that are not public: {stale}"
    missing = [
        f"{name}  ({where})"
        for name, where, documented in objects
        if not documented and name not in ALLOWED_UNDOCUMENTED
    ]
    assert not missing, (
        f"{len(missing)} public object(s) without a docstring (the API reference leaves "
        "them out):\n" + "\n".join(missing)
    )
    now_documented = sorted(
        name for name, _, documented in objects if documented and name in ALLOWED_UNDOCUMENTED
    )
    assert not now_documented, (
        f"documented now, so take them out of ALLOWED_UNDOCUMENTED: {now_documented}"
    )


# -- the API reference builds --------------------------------------------------------


def _inventory(path: Path) -> set[str]:
    """The object names in a Sphinx inventory (``objects.inv``, as mkdocstrings writes it)."""
    raw = path.read_bytes()
    header_end = 0
    for _ in range(4):  # four header lines, then zlib
        header_end = raw.index(b"\n", header_end) + 1
    text = zlib.decompress(raw[header_end:]).decode()
    return {line.split(" ", 1)[0] for line in text.splitlines() if line.strip()}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_reference_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (warnings are errors: a reference to an object that is
    gone, a docstring mkdocstrings cannot parse, a broken link), and the reference has
    an entry for every name that ``kew`` and ``kew.task`` export."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "griffe") if not _installed(m)]
    missing += [] if _installed("mkdocstrings_handlers.python") else ["mkdocstrings-python"]
    require(not missing, f"{', '.join(missing)} not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config, out = str(ROOT / "mkdocs.yml"), str(site)
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config, "-d", out],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    for page in ("getting-started", "reference/kew", "reference/task", "reference/spi"):
        assert (site / page / "index.html").is_file(), page
    inventory = _inventory(site / "objects.inv")
    expected = set()
    for module_name in DOCUMENTED_MODULES:
        module = importlib.import_module(module_name)
        expected |= {f"{module_name}.{name}" for name in module.__all__}
    # kew/connect.py (the module) shadows kew.connect (the function) for griffe, which
    # reads the source: the reference shows these three under the module's path.
    shadowed = {
        f"kew.{n}": f"kew.connect.{n}" for n in ("connect", "known_schemes", "DEFAULT_URL", "ping")
    }
    absent = sorted(
        name
        for name in expected
        if name not in inventory
        and shadowed.get(name) not in inventory
        and name not in ALLOWED_UNDOCUMENTED
    )
    assert not absent, f"exported but not in the API reference: {absent}"
    for name in ("kew.task.mail.MailNotifier", "kew.idempotency.open_store", "kew.web.create_app"):
        assert name in inventory, name
    # the docstrings are there, not only the names
    html = (site / "reference" / "kew" / "index.html").read_text()
    assert "A typed queue on a connector" in html


# -- the getting-started guide runs as written -------------------------------------


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def _guide_program(tmp_path: Path) -> Path:
    blocks = _python_blocks(GETTING_STARTED.read_text())
    assert len(blocks) >= 5, "docs/getting-started.md lost its Python blocks"
    script = tmp_path / "getting_started.py"
    script.write_text("\n\n".join(blocks))
    return script


def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    """The ```python blocks of docs/getting-started.md, in order, as one program in a
    fresh process, in an empty directory, on the default URL (KEW_URL unset)."""
    script = _guide_program(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "KEW_URL"}
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("cannot send to queue 'thumbnails': Expected `int`, got `str`"), out
    assert "$.image_id" in out[0]
    assert "rendered 99 thumbnails" in out
    assert any("render_async is an async function" in line for line in out), out
    assert "image 1 rendered at attempt 2" in out
    assert "image 13: giving up after 4 attempts" in out
    # two dead letters: the reason's first line, delivered once, the body as JSON
    dead = [
        line for line in out if re.match(r'ValueError: size \d+ is too large 1 \{"image_id"', line)
    ]
    assert len(dead) == 2, out
    assert re.search(r"^\[Thumbnail\(image_id=50[01], size=\d+\)\]$", r.stdout, re.M), out
    assert "'memory'" in out[-1] and "'sqlite'" in out[-1], out
    # the default URL: an SQLite file in the working directory
    assert (tmp_path / "kew.sqlite3").is_file()
    # what kew logged (logger "kew", WARNING and above reach stderr unconfigured)
    assert "no attempts left, handed to on_exceeded" in r.stderr, r.stderr
    assert r.stderr.count("it goes to the dead letters: ValueError") == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_getting_started_typechecks(tmp_path: Path) -> None:
    """The guide says mypy checks every send: its program passes ``mypy --strict`` (and
    the one ill-typed send needs its ``type: ignore``, or strict mode would complain)."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    require(mypy is not None, "mypy is not installed; it is in the 'dev' extra")
    assert mypy is not None
    script = _guide_program(tmp_path)
    r = subprocess.run(
        [mypy, "--strict", "--no-incremental", "--cache-dir", os.devnull, str(script)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
