"""The sparsity sweep, generalization and robustness scripts, offline: reduced runs on the small toy zoo (two or
three tasks, 16 test images, 2 steps), their --help, and bad input as one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
FAST = ["--steps", "2", "--max-test-images", "16", "--eval-batch-size", "16", "--quiet"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, args: list[str], tmp_path: Path) -> tuple[list[dict], str]:
    script = load(name)
    output = tmp_path / "results"
    assert script.run_main(script.main, [*args, *FAST, "--workdir", str(tmp_path / "work"), "--output", str(output)]) == 0
    rows = json.loads((output / "results.json").read_text())
    return rows, (output / "results.md").read_text()


def test_sparsity_sweep_on_the_toy_zoo(toy_zoo_small, tmp_path):
    rows, markdown = run(
        "reproduce_sparsity",
        ["--zoo", str(toy_zoo_small.root), "--tasks", "digits,colors", "--sparsity", "0.5,0.9", "--oracle"],
        tmp_path,
    )
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == [
        "task-arithmetic", "wemoe", "oracle routing (wemoe bound)", "e-wemoe (sparsity 0.5)",
        "oracle routing (e-wemoe (sparsity 0.5) bound)", "e-wemoe (sparsity 0.9)",
        "oracle routing (e-wemoe (sparsity 0.9) bound)",
    ]  # fmt: skip
    half, tenth, dense = by_method["e-wemoe (sparsity 0.5)"], by_method["e-wemoe (sparsity 0.9)"], by_method["wemoe"]
    # Fewer kept task-vector entries: fewer stored values and fewer bytes on disk, measured from the saved merges.
    assert dense["parameters"] > half["parameters"] > tenth["parameters"] > by_method["task-arithmetic"]["parameters"]
    assert dense["saved_bytes"] > half["saved_bytes"] > tenth["saved_bytes"]
    assert {row["adaptation"] for row in (half, tenth, dense)} == {"entropy, 2 steps"}
    config = json.loads((tmp_path / "work" / "e-wemoe-sparsity-0.9" / "config.json").read_text())
    assert config["sparsity"] == 0.9 and config["shared_router"] is True
    assert "| e-wemoe (sparsity 0.9) | 0.9 | entropy, 2 steps |" in markdown
    assert (tmp_path / "results" / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_sweep_on_the_toy_zoo(toy_zoo_small, tmp_path):
    rows, markdown = run(
        "sweep_rank", ["--zoo", str(toy_zoo_small.root), "--tasks", "digits,colors", "--ranks", "2,8"], tmp_path
    )
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["task-arithmetic", "wemoe", "e-wemoe", "wemoe (rank 2)", "wemoe (rank 8)"]
    low, high, dense = by_method["wemoe (rank 2)"], by_method["wemoe (rank 8)"], by_method["wemoe"]
    # Rank R stores K * R * (in + out) values per routed weight: more with the rank, fewer than dense storage.
    assert dense["parameters"] > high["parameters"] > low["parameters"] > by_method["task-arithmetic"]["parameters"]
    package = "calibrated + infomax + routing 3, 2 steps"  # the package's adaptation, labelled in every row
    assert {row["adaptation"] for row in (low, high, dense, by_method["e-wemoe"])} == {package}
    config = json.loads((tmp_path / "work" / "wemoe-rank-8" / "config.json").read_text())
    assert config["rank"] == 8 and config["sparsity"] == 0.0
    summary = next(line for line in markdown.splitlines() if line.startswith("| wemoe (rank 8) | 8 |"))
    cells = [cell.strip() for cell in summary.strip("|").split("|")]
    # vs dense WEMoE, parameters against the backbone (the static merge) and the forward-time ratio are filled in.
    assert cells[4] == f"{high['average'] - dense['average']:+.1f}"
    assert cells[7] == f"{high['parameters'] / by_method['task-arithmetic']['parameters']:.2f}×"
    assert cells[9].endswith("×") and float(cells[9][:-1]) > 0


def test_generalization_on_the_toy_zoo_never_merges_or_adapts_on_unseen_tasks(toy_zoo_small, tmp_path):
    # The toy zoo's split 1 holds out digits (and scenes, not chosen here).
    rows, markdown = run(
        "reproduce_generalization", ["--zoo", str(toy_zoo_small.root), "--tasks", "digits,colors,dots"], tmp_path
    )
    methods = [row["method"] for row in rows]
    assert methods == ["pretrained (zero-shot)", "individual experts", "average", "task-arithmetic", "ties", "wemoe",
                       "e-wemoe"]  # fmt: skip
    for row in rows:
        assert row["seen_average"] == pytest.approx((row["colors"] + row["dots"]) / 2, abs=0.01)
        if row["method"] == "individual experts":
            assert "digits" not in row and row["unseen_average"] is None  # no expert of its own
        else:
            assert row["unseen_average"] == pytest.approx(row["digits"], abs=0.01)
    for folder in ("wemoe", "wemoe-adapted-0", "e-wemoe", "ties"):
        config = json.loads((tmp_path / "work" / folder / "config.json").read_text())
        assert config.get("expert_names", ["colors", "dots"]) == ["colors", "dots"]
    merge = (tmp_path / "work" / "ties" / "merge_config.yaml").read_text()
    assert "colors" in merge and "digits" not in merge
    assert "| method | adaptation | seen average | digits (unseen) | unseen average |" in markdown
    assert "adaptation from the merge as built: entropy, 2 steps, Adam lr 0.001" in markdown


def test_robustness_on_the_toy_zoo_adapts_and_evaluates_each_corrupted_split(toy_zoo_small, tmp_path):
    rows, markdown = run(
        "reproduce_robustness",
        ["--zoo", str(toy_zoo_small.root), "--tasks", "digits,colors", "--corruptions", "clean,pixelate"],
        tmp_path,
    )
    assert [(row["split"], row["method"]) for row in rows] == [
        (split, method) for split in ("clean", "pixelate") for method in ("task-arithmetic", "wemoe", "e-wemoe")
    ]
    corrupted = toy_zoo_small.root.parent / f"{toy_zoo_small.root.name}-corrupted-1-s3" / "digits"
    assert f"{corrupted}#pixelate[:16]" in markdown and f"{toy_zoo_small.dataset_path('digits')}#test[:16]" in markdown
    assert (tmp_path / "work" / "pixelate" / "wemoe-adapted-0").is_dir()
    assert "| method | adaptation | clean | pixelate |" in markdown


@pytest.mark.parametrize("name", ["reproduce_sparsity", "reproduce_generalization", "reproduce_robustness",
                                  "reproduce_ta8", "sweep_rank"])  # fmt: skip
def test_help_says_what_a_run_needs(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "GPU time" in text and "base-patch32" in text and "large-patch14" in text
    assert "Hub" in text


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("reproduce_sparsity", ["--sparsity", "0.5,1.0"], r"sparsity must be in \[0, 1\)"),
        ("reproduce_sparsity", ["--sparsity", "0.5,lots"], "invalid comma-separated list of numbers value"),
        ("reproduce_robustness", ["--corruptions", "clean,fog"], "unknown corruption 'fog'"),
        ("reproduce_robustness", ["--severity", "2"], "--severity sets the toy zoo's corruptions"),
        ("reproduce_generalization", ["--unseen", "cifar10"], r"unknown task\(s\) \['cifar10'\] in the unseen split"),
        ("reproduce_generalization", ["--tasks", "sun397,dtd"], "split 1's unseen tasks"),
        ("reproduce_ta8", ["--tasks", "mnist,cifar10"], r"unknown TA8 task\(s\) \['cifar10'\]"),
        ("reproduce_ta8", ["--step", "3"], "unknown option '--step'"),
        ("sweep_rank", ["--ranks", "4,0"], r"ranks must be positive integers, got \[0\]"),
        ("sweep_rank", ["--ranks", "4,4"], "a rank is given twice"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(name, args, message, tmp_path, capsys):
    script = load(name)
    output = tmp_path / "results"
    code = script.run_main(script.main, [*args, "--output", str(output), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not output.exists() and not (tmp_path / "work").exists()
