"""The distribution as a new user gets it: build the wheel and the sdist,
install the wheel with one extra into a fresh venv, and run the README's
example from there (not from this checkout)."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    return str(blocks[0])


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def test_wheel_metadata(dist: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    assert wheel.name.startswith("ome_kew-")
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
        names = z.namelist()
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Name"] == "ome-kew"
    assert meta["License-Expression"] == "BSD-2-Clause"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    requires = meta.get_all("Requires-Dist") or []
    assert not any(r.startswith("typing-extensions") for r in requires)
    assert not any("aiosmtpd" in r and "demo" not in r and "dev" not in r for r in requires)
    assert meta.get_all("Classifier") and meta.get_all("Project-URL")
    assert "kew/py.typed" in names
    assert "redis = kew_redis:connect [redis]" in entry_points


def test_sdist_has_docs_examples_and_license(dist: Path) -> None:
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "docs/wire-format.md", "examples/demo.py"):
        assert needed in names, f"{needed} missing from the sdist"


def test_readme_example_runs_from_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    extra = [f"{wheel}[redis]"]
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *extra],
        check=True,
        timeout=600,
    )
    # The extra brought its client, and the provider registry knows the scheme.
    check = "import redis, kew; print(sorted(kew.known_schemes()))"
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=True)
    assert "redis" in out.stdout
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [str(python), "-c", _readme_example()],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "render 42"
    assert (work / "kew.sqlite3").exists()
