"""A short soak: a mixed, hostile request stream against a live server process, with
every answer accounted for, no leaks, and correct images at the end (benchmarks/soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
MINUTES = 0.3


def test_short_soak_passes_every_check(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--minutes", str(MINUTES), "--json", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert out.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [] and run.returncode == 0, report["failures"]
    statuses = report["statuses"]
    for status in ("200", "400", "404", "408", "413", "499"):
        assert statuses.get(status, 0) > 0, f"no {status} in the mix: {statuses}"
    assert report["cancelled"] > 0 and report["completed_images"] > 0
    assert report["metrics"]["mismatches"] == [] and report["unexpected"] == 0
    assert report["image"]["mismatch"] is None and report["image"]["judge_ok"]
    assert report["exit_code"] == 0
