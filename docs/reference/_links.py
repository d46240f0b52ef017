"""MkDocs hook (mkdocs.yml ``hooks``): links from the narrative docs to files of the repository.

docs/*.md link to source files the way GitHub shows them (``../kew/embedded/memory.py``); the
site has no such page, so a link that leaves ``docs/`` and names a file that exists in the
repository is pointed at that file on GitHub.  A link to a missing file is left alone, so that
``mkdocs build --strict`` still fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """The page's Markdown with its links to repository files pointed at GitHub."""
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent  # the repository: mkdocs.yml and docs/ are at its top
    repo = str(config.get("repo_url") or "").rstrip("/")
    here = docs / posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match[str]) -> str:
        target = (here / m.group(1)).resolve()
        if not repo or target.is_relative_to(docs) or not target.is_relative_to(root):
            return m.group(0)
        if not target.is_file():
            return m.group(0)  # missing: mkdocs --strict reports it
        return f"]({repo}/blob/main/{target.relative_to(root).as_posix()}{m.group(2) or ''})"

    return _LINK.sub(fix, markdown)
