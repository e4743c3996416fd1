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
    assert "| method | routing | " + " | ".join(tasks) + " | average |" in printed
    rows = json.loads((output / "results.json").read_text())
    assert [row["method"] for row in rows] == [
        "pretrained (zero-shot)", "individual experts", "average", "task-arithmetic", "ties", "wemoe",
        "oracle routing (upper bound)", "e-wemoe",
    ]  # fmt: skip
    for row in rows:
        assert set(row) == {"method", "routing", *tasks, "average"}
        assert all(0 <= row[t] <= 100 for t in tasks)
        assert abs(row["average"] - sum(row[t] for t in tasks) / len(tasks)) < 0.01
    by_method = {row["method"]: row for row in rows}
    assert by_method["wemoe"]["routing"] == "sample"
    # The experts beat the pretrained model on their own tasks, and the oracle bound is close to them.
    assert by_method["individual experts"]["average"] > by_method["pretrained (zero-shot)"]["average"]
    assert (output / "results.md").read_text().count("\n|") >= len(rows) + 1
