"""mypy --strict rejects a handler of the wrong kind where kew.aio awaits one
(a plain function, an async handler of another type) and a value of another
type: tests/typing/aio_handlers.py marks each line that must be an error."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "typing" / "aio_handlers.py"


def _mypy() -> str:
    found = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if not found:
        pytest.fail("mypy is not installed; it is in the 'dev' extra")
    return found


def test_mypy_strict_rejects_the_mismatches() -> None:
    expected = {
        n: m.group(1)
        for n, line in enumerate(CASES.read_text().splitlines(), 1)
        if (m := re.search(r"# expect: ([a-z-]+)", line))
    }
    assert len(expected) == 7
    r = subprocess.run(
        [_mypy(), "--strict", "--show-error-codes", "--no-error-summary", str(CASES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r"aio_handlers\.py:(\d+): error: .*\[([a-z-]+)\]$", r.stdout, re.M)
    }
    assert errors == expected, r.stdout + r.stderr
    assert 'expected "Callable[[int], Awaitable[object]]"' in r.stdout
