"""The README's main demo runs to the end (``--no-wait``) and says what happened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEW_", "FAKE_OMERO"))}
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--no-wait", "--dir", str(tmp_path)],
        cwd=ROOT,
        env={**env, "KEW_DEMO_EXIT": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "POST /ome/import with a batch of three" in out
    assert out.count("/ome/import/") >= 3  # the poll URLs
    assert "plate-ok.tif             = SUCCEEDED after 1 attempt(s)" in out
    assert "plate-fail-once.tif      = SUCCEEDED after 2 attempt(s)" in out
    assert "plate-fail-always.tif    = FAILED after 3 attempt(s)" in out
    assert "IMPORT_DONE Imported file:" in out  # the importer's output, followed
    assert "To: ann@facility.example" in out and "To: omero-admin@facility.example" in out
    assert "imported: 2" in out and "failed:   1" in out and "e-mails:  2" in out
    assert "Monitoring page: http://127.0.0.1:" in out and "token: " in out
    assert "demo OK" in out
    assert (tmp_path / "kew.sqlite3").exists()  # the embedded SQLite default, in its directory
