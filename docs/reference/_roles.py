"""Griffe extension (mkdocs.yml, mkdocstrings ``extensions``): Sphinx roles in docstrings.

kew's docstrings name other objects the Sphinx way (``:class:`TaskEvent```,
``:meth:`App.status <kew.task.App.status>```, ``:func:`~kew.connect.connect```), which
Markdown would show as they are.  Each role becomes a code span that links to the object
when the reference has it (an *optional* cross-reference: no link, and no warning, when it
does not).  Relative names are resolved in the scope of the docstring's object, as Sphinx
does.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|exc|mod|obj|const):`([^`]+)`")
_EXPLICIT = re.compile(r"^(.*?)\s*<([^<>]+)>$")


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` stands for, seen from ``obj``; None if it is not kew's."""
    if name.startswith("kew.") or name == "kew":
        return name
    first, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(first)
    except (griffe.NameResolutionError, AttributeError, KeyError):
        return None
    full = f"{resolved}.{rest}" if rest else resolved
    return full if full.startswith("kew") else None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def one(m: re.Match[str]) -> str:
        body = m.group(1).strip()
        explicit = _EXPLICIT.match(body)
        if explicit:
            title, name = explicit.group(1), explicit.group(2).lstrip("~")
        else:
            name = body.lstrip("~")
            title = name.rsplit(".", 1)[-1] if body.startswith("~") else name
        target = _target(obj, name)
        code = f"<code>{title}</code>"
        if target is None:
            return code
        return f'<autoref identifier="{target}" optional>{code}</autoref>'

    return _ROLE.sub(one, text)


def _walk(obj: griffe.Object, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, seen)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
