"""`hf-wemoe analyze`: task-vector sizes and ranks of full and LoRA experts, checked against direct computation
(dense SVDs of the state dicts, and PEFT's own merge for LoRA experts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import write_checkpoint
from hf_wemoe.cli.main import main
from hf_wemoe.workflows.analyze import AnalyzeConfig, rank_for_energy, run_analyze
from lora_adapters import make_adapter, peft_merged
from tiny_models import make_base_and_experts

# Singular values of the planted task vector of layer 1's fc1: energies 16, 9, 4, 1 (of 30).
PLANTED = torch.tensor([4.0, 3.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base, a full expert (noise everywhere, a planted rank-4 task vector in layer 1's fc1) and a LoRA adapter."""
    root = tmp_path_factory.mktemp("analyze")
    base, experts = make_base_and_experts(num_experts=1, seed=0)
    expert = experts["task0"]
    generator = torch.Generator().manual_seed(5)
    weight = expert.encoder.layers[1].mlp.fc1.weight  # (64, 32)
    left = torch.linalg.qr(torch.randn(64, 4, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(32, 4, generator=generator)).Q
    with torch.no_grad():
        weight.copy_(base.encoder.layers[1].mlp.fc1.weight + left @ torch.diag(PLANTED) @ right.T)
    folders = {"base": write_checkpoint(base, root / "base"), "full": write_checkpoint(expert, root / "full")}
    folders["lora"] = make_adapter(
        folders["base"], root / "lora", seed=3, r=3, lora_alpha=6, target_modules=["q_proj", "fc2"]
    )
    return folders


def make_state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_rank_for_energy():
    assert [rank_for_energy(PLANTED, e) for e in (0.5, 0.6, 0.9, 29 / 30, 0.99, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert rank_for_energy(torch.zeros(5), 0.9) == 0
    assert rank_for_energy(torch.zeros(0), 0.9) == 0


def test_full_and_lora_experts_measured_like_a_dense_svd(world):
    summary = run_analyze(
        AnalyzeConfig(
            base=str(world["base"]), experts={"full": str(world["full"]), "lora": str(world["lora"])}
        ),
        show_progress=False,
    )
    base = {k: v.double() for k, v in make_state(world["base"]).items()}
    thetas = {"full": make_state(world["full"]), "lora": peft_merged(world["base"], world["lora"])}
    assert len(summary.modules) == 3 * 6
    for row in summary.modules:
        parent = "mlp" if row.module.startswith("fc") else "self_attn"
        key = f"encoder.layers.{row.layer}.{parent}.{row.module}.weight"
        for name, theta in thetas.items():
            tau = theta[key].double() - base[key]
            expected = float(tau.norm() / base[key].norm())
            assert row.relative_norm[name] == pytest.approx(expected, rel=1e-5, abs=1e-9), (key, name)
            assert row.rank[name] == rank_for_energy(torch.linalg.svdvals(tau), 0.9), (key, name)
        lora_adapted = row.module in ("q_proj", "fc2")
        assert (row.rank["lora"] > 0) == lora_adapted and row.rank["lora"] <= 3
    planted = next(row for row in summary.modules if (row.layer, row.module) == (1, "fc1"))
    assert planted.rank["full"] == 3 and planted.full_rank == 32
    assert summary.experts["lora"].startswith("LoRA r=3 (q_proj, fc2)")
    assert summary.experts["full"].startswith("full fine-tune")


def test_the_cli_prints_and_writes_the_report(world, tmp_path, capsys):
    output = tmp_path / "report"
    args = ["analyze", "-q", "--base", str(world["base"]), "--expert", f"full={world['full']}"]
    args += ["--expert", f"lora={world['lora']}", "--energy", "0.6", "--output", str(output)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## Rank that keeps 60% of ‖τ‖²" in printed and "| 1 | fc1 | 32 | 2 | 0 |" in printed
    assert sorted(path.name for path in output.iterdir()) == ["analysis.json", "analysis.md", "analysis.png"]
    assert (output / "analysis.md").read_text() in printed
    record = json.loads((output / "analysis.json").read_text())
    assert record["energy"] == 0.6 and list(record["experts"]) == ["full", "lora"]
    assert (output / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
