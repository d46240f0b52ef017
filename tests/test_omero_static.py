"""The OMERO import example and the demo are typed too: mypy --strict passes on
them (the repo-wide static test covers the packages only)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_on_the_example() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if not mypy:
        pytest.fail("mypy is not installed; it is in the 'dev' extra")
    r = subprocess.run(
        [mypy, "--strict", "--explicit-package-bases", "examples/omero_import", "examples/demo.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
