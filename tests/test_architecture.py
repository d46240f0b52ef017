"""ARCHITECTURE.md, checked: each layer imports only the layers below it,
providers import no other provider and nothing above the SPI, nothing above
the SPI imports a provider, no module-level import cycle, and no module in
the packages is longer than the bound."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kew", "kew_redis", "kew_rabbitmq", "kew_artemis")
PROVIDERS = ("kew.embedded", "kew_redis", "kew_rabbitmq", "kew_artemis")
MAX_LINES = 700

#: (module prefix, rank): a module imports only modules of its rank or lower.
RANKS = [
    ("kew.core", 0),
    ("kew.qchan.spi", 1),
    ("kew.embedded", 2),
    ("kew_", 2),
    ("kew.qchan", 3),
    ("kew.aio", 3),
    ("kew.connect", 3),
    ("kew.idempotency", 4),
    ("kew.task", 4),
    ("kew.web", 5),
    ("kew.cli", 5),
    ("kew.testing", 8),  # the kits use everything, kew itself included
]


def _rank(module: str) -> int:
    best = (-1, 7)  # kew itself (kew/__init__.py) is the top
    for prefix, rank in RANKS:
        if (
            module == prefix
            or module.startswith(prefix + ".")
            or (prefix.endswith("_") and module.startswith(prefix))
        ) and len(prefix) > best[0]:
            best = (len(prefix), rank)
    return best[1]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _top_level_imports(path: Path, module: str) -> set[str]:
    """Modules imported when ``module`` is imported: module level, not under
    ``if TYPE_CHECKING:``, not inside functions."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                out.add(base)
            elif isinstance(node, ast.If | ast.Try):
                for body in ("body", "orelse", "finalbody"):
                    visit(getattr(node, body, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, path in _modules().items():
        for imported in _top_level_imports(path, module):
            if _rank(imported) > _rank(module):
                wrong.append(f"{module} (rank {_rank(module)}) imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_providers_stay_in_their_room() -> None:
    wrong = []
    for module, path in _modules().items():
        mine = next((p for p in PROVIDERS if module == p or module.startswith(p)), None)
        for imported in _top_level_imports(path, module):
            theirs = next((p for p in PROVIDERS if imported == p or imported.startswith(p)), None)
            if mine and theirs and theirs != mine:
                wrong.append(f"provider {module} imports provider {imported}")
            if mine and not theirs and not imported.startswith(("kew.qchan.spi", "kew.core")):
                wrong.append(f"provider {module} imports {imported} (above the SPI)")
            if theirs and not mine and not module.startswith("kew.testing"):
                wrong.append(f"{module} imports provider {imported} (use kew.connect)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {m: {i for i in _top_level_imports(p, m) if i in modules} for m, p in modules.items()}
    cycles = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, "\n".join(cycles)


def test_modules_stay_small() -> None:
    long = {
        m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
