"""Merging PEFT LoRA experts, checked against PEFT's own `merge_and_unload`."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import CLIPVisionModel

from checkpoints import write_expert_world
from hf_wemoe.cli.main import main
from lora_adapters import make_adapter, peft_merged


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-lora")
    folders = write_expert_world(root, num_experts=1, seed=0)
    base = folders["base"]
    folders["qv"] = make_adapter(
        base, root / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    folders["mlp"] = make_adapter(
        base, root / "mlp", seed=2, r=2, lora_alpha=4, use_rslora=True, target_modules=r".*\.mlp\.fc[12]"
    )
    return folders


def test_static_merges_use_the_adapters_merged_into_the_base(world, tmp_path, capsys):
    output = tmp_path / "ta"
    args = ["merge", "-q", "--base", str(world["base"]), "--method", "task-arithmetic", "--scaling", "0.5"]
    args += [
        "--expert",
        f"qv={world['qv']}",
        "--expert",
        f"mlp={world['mlp']}",
        "--expert",
        f"full={world['task0']}",
    ]
    assert main([*args, "--output", str(output)]) == 0
    merged = CLIPVisionModel.from_pretrained(output).state_dict()
    theta0 = CLIPVisionModel.from_pretrained(world["base"]).state_dict()
    thetas = [
        peft_merged(world["base"], world["qv"]),
        peft_merged(world["base"], world["mlp"]),
        CLIPVisionModel.from_pretrained(world["task0"]).state_dict(),
    ]
    for key, tensor in merged.items():
        expected = theta0[key] + 0.5 * sum(theta[key] - theta0[key] for theta in thetas)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=2e-6, msg=key)
    recipe = yaml.safe_load((output / "merge_config.yaml").read_text())
    assert recipe["experts"]["qv"] == str(world["qv"]) and "rank" not in recipe
