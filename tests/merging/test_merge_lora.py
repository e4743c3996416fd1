"""Merging PEFT LoRA experts, checked against PEFT's own `merge_and_unload`.

What a WEMoE merge of LoRA experts computes: every routed linear layer (`--moe-modules`) holds W0 and each
expert's exact LoRA task vector scaling·B·A as factors, so collapsing the model to expert k's one-hot routing gives
W0 + tau_k there; every other weight is task arithmetic over all experts, theta0 + lambda·sum_k tau_k (zero for the
modules no adapter touches). Routing exactly the adapters' modules therefore reproduces PEFT's merge of adapter k.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import CLIPVisionModel

from checkpoints import write_expert_world
from hf_wemoe import WEMoECLIPVisionModel
from hf_wemoe.cli.main import main
from lora_adapters import edit_adapter_config, make_adapter, peft_merged


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


# ----------------------------------------------------------------------------------------------------------------
# WEMoE merges of LoRA experts: collapsing to one expert gives PEFT's merge of that adapter

ALL_MODULES = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"


@pytest.fixture(scope="module")
def variants(world, tmp_path_factory):
    """LoRA adapters with every option hf-wemoe honours, made by PEFT on the same base."""
    root = tmp_path_factory.mktemp("variants")
    base = world["base"]
    fan = make_adapter(base, root / "fan", seed=11, r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"])
    return {
        "rslora": make_adapter(
            base,
            root / "rslora",
            seed=10,
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
        ),
        # Conv1D's flag: PEFT turns it off for nn.Linear and so does hf-wemoe.
        "fan": edit_adapter_config(fan, fan_in_fan_out=True),
        "regex": make_adapter(
            base,
            root / "regex",
            seed=12,
            r=2,
            lora_alpha=4,
            target_modules=r".*layers\.[02]\.(self_attn\.k_proj|mlp\.fc1)",
        ),
        "layers": make_adapter(
            base,
            root / "layers",
            seed=13,
            r=3,
            lora_alpha=3,
            target_modules=["out_proj", "fc2"],
            layers_to_transform=[1, 2],
        ),
    }


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result = model(pixel_values=pixels())
    return torch.cat([result.last_hidden_state.flatten(1), result.pooler_output], dim=1)


def peft_model(base_folder, adapter) -> CLIPVisionModel:
    model = CLIPVisionModel.from_pretrained(base_folder).eval()
    model.load_state_dict(peft_merged(base_folder, adapter))
    return model


def merge_experts(world, output, experts: dict, *extra: str) -> WEMoECLIPVisionModel:
    args = ["merge", "-q", "--base", str(world["base"]), "--output", str(output), *extra]
    for name, folder in experts.items():
        args += ["--expert", f"{name}={folder}"]
    assert main(args) == 0
    return WEMoECLIPVisionModel.from_pretrained(output).eval()


def one_hot(k: int, n: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


def test_collapsing_to_a_lora_expert_gives_peft_merge(world, variants, tmp_path):
    output = tmp_path / "all-routed"
    model = merge_experts(world, output, variants, "--moe-modules", ALL_MODULES)
    assert model.config.rank == 4 and model.config.moe_modules == ALL_MODULES.split(",")
    for k, (name, adapter) in enumerate(variants.items()):
        expected = outputs(peft_model(world["base"], adapter))
        torch.testing.assert_close(
            outputs(model.collapse(one_hot(k, len(variants)))), expected, rtol=0, atol=1e-5, msg=name
        )
    low_rank = json.loads((output / "config.json").read_text())["provenance"]["low_rank"]
    assert low_rank["rank"] == 4
    assert low_rank["experts"]["regex"] == {"kind": "lora", "rank": 2}
    assert {value for layer in low_rank["kept_energy"].values() for value in layer.values()} == {1.0}
    recipe = yaml.safe_load((output / "merge_config.yaml").read_text())
    assert recipe["rank"] == 4 and recipe["moe_modules"] == ALL_MODULES.split(",")
    card = (output / "README.md").read_text()
    assert "low rank 4 (τk ≈ Bk·Ak; LoRA experts exact, as their own factors)" in card
    assert (
        "the PEFT LoRA adapters (rslora: rank 4, fan: rank 3, regex: rank 2, layers: rank 3) exactly" in card
        and "| 0 | 100% | 100% | 100% | 100% |" in card
    )
    # The recipe rebuilds identical weights.
    assert (
        main(
            [
                "merge",
                "-q",
                "--config",
                str(output / "merge_config.yaml"),
                "--output",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        output / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("method", ["wemoe", "e-wemoe"])
def test_routing_exactly_the_adapted_modules(world, variants, tmp_path, method):
    # q/v adapters with q_proj,v_proj routed: every other weight has no task vector and stays the base's.
    experts = {name: variants[name] for name in ("rslora", "fan")}
    model = merge_experts(
        world, tmp_path / method, experts, "--moe-modules", "q_proj,v_proj", "--method", method
    )
    assert model.config.shared_router is (method == "e-wemoe") and model.config.sparsity == 0.0
    for k, adapter in enumerate(experts.values()):
        collapsed = model.collapse(one_hot(k, 2))
        torch.testing.assert_close(
            outputs(collapsed), outputs(peft_model(world["base"], adapter)), rtol=0, atol=1e-5
        )
    base = CLIPVisionModel.from_pretrained(world["base"]).state_dict()
    state = model.collapse([0.0, 0.0]).state_dict()
    assert all(
        torch.equal(state[key], base[key])
        for key in base
        if ".self_attn.q_proj." not in key and ".v_proj." not in key
    )


def expected_collapse(
    world, routed: set[str], experts: dict, k: int, scaling: float = 0.3
) -> dict[str, torch.Tensor]:
    """What collapsing to expert k must give, as documented: routed layers W0 + tau_k, every other weight task
    arithmetic theta0 + scaling * sum_j tau_j (LoRA experts' tau_j from PEFT's merge)."""
    theta0 = CLIPVisionModel.from_pretrained(world["base"]).state_dict()
    thetas = [
        CLIPVisionModel.from_pretrained(folder).state_dict()
        if name == "full"
        else peft_merged(world["base"], folder)
        for name, folder in experts.items()
    ]
    expected = {}
    for key, w0 in theta0.items():
        parts = key.split(".")
        if len(parts) > 4 and parts[0] == "encoder" and parts[4] in routed:
            expected[key] = thetas[k][key]
        else:
            expected[key] = w0 + scaling * sum(theta[key] - w0 for theta in thetas)
    return expected


def test_mixed_lora_and_full_experts(world, tmp_path):
    root = tmp_path / "adapters"
    experts = {
        "full": world["task0"],
        "fc": make_adapter(
            world["base"], root / "fc", seed=20, r=4, lora_alpha=8, target_modules=["fc1", "fc2"]
        ),
        "qv": make_adapter(
            world["base"], root / "qv", seed=21, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]
        ),
    }
    # Rank 32 is the full rank of fc1 (64x32) and fc2 (32x64): the full fine-tune is kept exactly too.
    model = merge_experts(world, tmp_path / "exact", experts, "--rank", "32")
    assert model.config.rank == 32
    for k in range(3):
        expected = expected_collapse(world, {"fc1", "fc2"}, experts, k)
        state = model.collapse(one_hot(k, 3)).state_dict()
        for key, tensor in expected.items():
            torch.testing.assert_close(state[key], tensor, rtol=0, atol=2e-5, msg=key)

    # Without --rank the full fine-tune gets the largest LoRA rank; with a smaller one it is truncated below the
    # stored rank, which the LoRA experts keep.
    output = tmp_path / "truncated"
    model = merge_experts(world, output, {"full": world["task0"], "fc": experts["fc"]}, "--rank", "2")
    assert model.config.rank == 4
    low_rank = json.loads((output / "config.json").read_text())["provenance"]["low_rank"]
    assert low_rank["experts"] == {"full": {"kind": "full", "rank": 2}, "fc": {"kind": "lora", "rank": 4}}
    theta0 = CLIPVisionModel.from_pretrained(world["base"]).state_dict()
    theta = CLIPVisionModel.from_pretrained(world["task0"]).state_dict()
    for layer in range(3):
        kept = []
        for module in ("fc1", "fc2"):
            key = f"encoder.layers.{layer}.mlp.{module}.weight"
            power = torch.linalg.svdvals((theta[key] - theta0[key]).double()) ** 2
            kept.append(float(power[:2].sum() / power.sum()))
        assert low_rank["kept_energy"][str(layer)]["full"] == pytest.approx(sum(kept) / 2, rel=1e-6)
        assert low_rank["kept_energy"][str(layer)]["fc"] == 1.0
    recipe = yaml.safe_load((output / "merge_config.yaml").read_text())
    assert recipe["rank"] == 2
    card = (output / "README.md").read_text()
    assert (
        "factors: the full fine-tunes (full) truncated to rank 2 by SVD; the PEFT LoRA adapters (fc: rank 4) exactly"
        in card
    )
    default = merge_experts(world, tmp_path / "default", {"full": world["task0"], "fc": experts["fc"]})
    assert default.config.rank == 4
    assert yaml.safe_load((tmp_path / "default" / "merge_config.yaml").read_text())["rank"] == 4
