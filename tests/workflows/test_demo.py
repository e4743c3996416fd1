"""`hf-wemoe demo` end to end on the small toy zoo (short adaptation, a slice of the test images)."""

from __future__ import annotations

import json

from hf_wemoe.cli.main import main


def test_demo_runs_every_stage_and_writes_results(toy_zoo_small, tmp_path, capsys):
    output = tmp_path / "demo"
    args = ["demo", "--zoo", str(toy_zoo_small.root), "--preset", toy_zoo_small.preset, "--steps", "2",
            "--max-test-images", "40", "--output", str(output), "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    tasks = toy_zoo_small.tasks
    header = "| method | adaptation | routing | stream | " + " | ".join(tasks) + " | average | adaptation time |"
    assert header in printed
    rows = json.loads((output / "results.json").read_text())
    paper, calibrated = "entropy, 2 steps", "calibrated"
    ours = "calibrated + infomax + routing 3, 2 steps"
    moe_rows = []
    for method in ("wemoe", "e-wemoe"):
        moe_rows += [
            (method, paper, "sample", "per task"),
            (method, calibrated, "sample", "per task"),
            (method, ours, "sample", "per task"),
            (method, ours, "sample", "mixed, batch 128"),
            (method, ours, "batch", "mixed, batch 128"),
            (f"oracle routing ({method} bound)", None, None, "per task"),
        ]
    assert [(r["method"], r["adaptation"], r["routing"], r["stream"]) for r in rows] == [
        ("pretrained (zero-shot)", None, None, "per task"),
        ("individual experts", None, None, "per task"),
        ("average", None, None, "per task"),
        ("task-arithmetic", None, None, "per task"),
        ("ties", None, None, "per task"),
        *moe_rows,
        # Low-rank WEMoE (--rank, default 16) gets only the package's adaptation, and its own bound.
        ("wemoe (rank 16)", ours, "sample", "per task"),
        ("oracle routing (wemoe (rank 16) bound)", None, None, "per task"),
    ]
    for row in rows:
        assert set(row) == {"method", "adaptation", "routing", "stream", *tasks, "average", "seconds", "collapsed"}
        assert all(0 <= row[t] <= 100 for t in tasks)
        assert abs(row["average"] - sum(row[t] for t in tasks) / len(tasks)) < 0.01
        assert (row["seconds"] is not None) == (row["adaptation"] is not None)
    by_key = {(r["method"], r["adaptation"], r["routing"], r["stream"]): r for r in rows}
    # Per-sample routing does not depend on which images share a batch: the mixed stream changes nothing.
    for method in ("wemoe", "e-wemoe"):
        per_task, mixed = by_key[(method, ours, "sample", "per task")], by_key[(method, ours, "sample", "mixed, batch 128")]
        assert all(abs(per_task[t] - mixed[t]) < 1e-6 for t in tasks)
    # The calibration alone moves every task's routing off task arithmetic: it beats it without a gradient step.
    assert by_key[("wemoe", calibrated, "sample", "per task")]["average"] > by_key[("task-arithmetic", None, None, "per task")]["average"]
    by_method = {row["method"]: row for row in rows}
    assert by_method["individual experts"]["average"] > by_method["pretrained (zero-shot)"]["average"]
    assert (output / "results.md").read_text().count("\n|") >= len(rows) + 1
