"""`scripts/study_adaptation.py`: the per-task study of router adaptations, on the small toy zoo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_adaptation.py"


def test_study_prints_one_table_per_variant(toy_zoo_small):
    command = [sys.executable, str(SCRIPT), "--zoo", str(toy_zoo_small.root), "--steps", "2",
               "--max-test-images", "16", "--variant", "entropy", "--variant", "calibrated+infomax+routing=2+best"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "### entropy, 2 steps (CPU time" in out
    assert "### calibrated + infomax + routing 2 (best kept), 2 steps (CPU time" in out
    for task in toy_zoo_small.tasks:
        assert out.count(f"| {task} | ") == 2
    assert out.count("| **average** |") == 2


def test_study_refuses_an_unknown_word(toy_zoo_small):
    command = [sys.executable, str(SCRIPT), "--zoo", str(toy_zoo_small.root), "--variant", "calibrated+magic"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown word 'magic'" in result.stderr
