"""`scripts/benchmark.py` (the `benchmarks` package next to it): the harness, the FusionBench adapter and the
report, at a tiny shape. Nothing here measures speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SECTIONS = [
    "## Setup",
    "## Forward",
    "## Router-training step",
    "## Merge and saved size",
    "## Low-rank task vectors",
    "## Targets",
    "## Notes",
]


@pytest.fixture
def benchmarks(monkeypatch):
    """The `benchmarks` package, importable as the entry script imports it."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import benchmarks

    return benchmarks


def test_round_robin_interleaves_and_warms_up_only_repeated_variants(benchmarks):
    from benchmarks.harness import round_robin, single_thread_cpu_times

    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "slow")}
    times = round_robin(variants, {"a": 2, "b": 2, "slow": 1}, torch.device("cpu"))
    # One untimed warm-up for a and b, then rounds; "slow" runs once, untimed warm-up skipped.
    assert calls == ["a", "b", "a", "b", "slow", "a", "b"]
    assert {name: len(values) for name, values in times.items()} == {"a": 2, "b": 2, "slow": 1}
    calls.clear()
    threads = torch.get_num_threads()
    cpu = single_thread_cpu_times(variants, 2, once={"slow"})
    assert calls == ["a", "b", "slow", "a", "b"]
    assert {name: len(values) for name, values in cpu.items()} == {"a": 2, "b": 2, "slow": 1}
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("genuine", [True, False], ids=["fusion-bench", "re-implementation"])
def test_fusionbench_adapter_matches_per_sample_routing(benchmarks, monkeypatch, genuine):
    from benchmarks import fusionbench
    from benchmarks.variants import make_wemoe, pixel_values

    if genuine:
        pytest.importorskip("fusion_bench.models.we_moe")
    else:
        monkeypatch.setattr(
            fusionbench, "fusionbench_class", lambda: (fusionbench.ReimplementedWeightEnsemblingMoE, False)
        )
    wemoe = make_wemoe("tiny")
    model, used_genuine = fusionbench.make_fusionbench(wemoe)
    assert used_genuine is genuine
    x = pixel_values("tiny", 3)
    with torch.inference_mode():
        ours, theirs = wemoe(x), model(x)
    # The routers are far from uniform, so agreement means the gates hold the routers and samples are routed apart.
    assert (ours.pooler_output - wemoe.collapse(torch.full((8,), 0.3))(x).pooler_output).abs().max() > 1e-4
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs.pooler_output, ours.pooler_output, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_smoke_run_writes_every_section_and_rerenders_from_json(tmp_path):
    pytest.importorskip("psutil")
    report, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPTS / "benchmark.py"), "--smoke", "--threads", "1"]
    run = subprocess.run(
        [*command, "--output", str(report), "--json", str(raw)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = report.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    assert "- command: `python scripts/benchmark.py --smoke --threads 1`" in text
    assert "failed:" not in text  # every training worker and every merge ran
    for row in ("| static CLIPVisionModel |", "| FusionBench per-sample |", "`hf-wemoe merge`: E-WEMoE-90%, bfloat16"):
        assert row in text
    saved = json.loads(raw.read_text())
    results = saved["results"]
    assert set(results) == {"load_start", "forward", "train", "merge", "lowrank"}
    forward = results["forward"]["batches"]
    assert list(forward) == ["2", "4"]
    assert forward["2"]["max_abs_diff_last_hidden"] <= 1e-4
    assert len(results["train"]["runs"]) == 4 and not any("error" in r for r in results["train"]["runs"])
    assert all(m["output_bytes"] > 0 for m in results["merge"]["merges"].values())
    assert len(results["merge"]["merges"]) == 4 and results["merge"]["load_all"]["peak_rss"] > 0
    # The low-rank section: every rank timed at every batch with the static model, trained, saved and counted.
    lowrank = results["lowrank"]
    assert lowrank["ranks"] == [4, 16] and list(lowrank["forward"]) == ["1", "2", "4"]
    assert all(len(entry["times"]) == 5 for entry in lowrank["forward"].values())  # static + 2 ranks x 2 modes
    assert [run["name"] for run in lowrank["train"]] == ["rank 4 per-sample", "rank 16 per-sample"]
    assert not any("error" in run for run in lowrank["train"])
    sizes = lowrank["sizes"]
    assert sizes["static CLIPVisionModel"]["parameters"] < sizes["rank 4 per-sample"]["parameters"]
    assert sizes["rank 4 per-sample"]["parameters"] < sizes["rank 16 per-sample"]["parameters"]
    assert "| rank-16 WEMoE stores <= 1.25x the backbone's parameters |" in text
    # Re-rendering measures nothing and gives the same report (but for the load average at its end).
    again = tmp_path / "again.md"
    rerun = subprocess.run(
        [*command, "--report-from", str(raw), "--output", str(again)], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    def without_end_load(markdown: str) -> list[str]:
        return [line.split(", at end:")[0] for line in markdown.splitlines()]

    assert without_end_load(again.read_text()) == without_end_load(text)
