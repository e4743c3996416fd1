"""`hf-wemoe merge` with --rank, --moe-modules and LoRA experts, on bad input: one `error:` line, exit code 2, no
traceback, nothing written, no code run from a pickle file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bad_input import entries, run_error, write_malicious_pickle
from checkpoints import write_checkpoint, write_expert_world
from lora_adapters import edit_adapter_config, make_adapter
from tiny_models import make_base_and_experts


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-merge-lora")
    folders = write_expert_world(root, num_experts=1, seed=0)
    base = folders["base"]
    folders["qv"] = make_adapter(base, root / "qv", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    folders["qv2"] = make_adapter(base, root / "qv2", seed=2, r=2, target_modules=["q_proj", "v_proj"])
    folders["fc"] = make_adapter(base, root / "fc", seed=3, r=4, target_modules=["fc1", "fc2"])
    folders["wide-rank"] = make_adapter(base, root / "wide-rank", seed=4, r=40, target_modules=["fc1"])
    folders["conv"] = make_adapter(base, root / "conv", seed=5, r=2, target_modules=["patch_embedding"])
    deep = write_checkpoint(make_base_and_experts(0, seed=1, num_hidden_layers=4)[0], root / "deep")
    folders["deep"] = edit_adapter_config(
        make_adapter(deep, root / "deep-lora", seed=6, r=2, target_modules=["fc1"]), base_model_name_or_path=None
    )
    wide = write_checkpoint(make_base_and_experts(0, seed=1, hidden_size=48)[0], root / "wide")
    folders["wide"] = edit_adapter_config(
        make_adapter(wide, root / "wide-lora", seed=7, r=2, target_modules=["fc1"]), base_model_name_or_path=None
    )
    return folders


def copy_of(world: dict[str, Path], tmp: Path, name: str, how: str) -> Path:
    """A copy of adapter `name`, spoiled in one way."""
    folder = Path(shutil.copytree(world[name], tmp / f"{name}-{how}"))
    weights = folder / "adapter_model.safetensors"
    if how == "dora":
        edit_adapter_config(folder, use_dora=True)
    elif how == "loha":
        edit_adapter_config(folder, peft_type="LOHA")
    elif how == "no-weights":
        weights.unlink()
    elif how == "pickle":
        torch.save(load_file(weights), folder / "adapter_model.bin")
        weights.unlink()
    elif how == "malicious-pickle":
        weights.unlink()
        write_malicious_pickle(folder / "adapter_model.bin", tmp / "ran", torch_format=True)
    elif how == "other-base":
        edit_adapter_config(folder, base_model_name_or_path=str(world["task0"]))
    else:
        raise ValueError(how)
    return folder


def lora(world, tmp, name: str, how: str | None = None) -> list[str]:
    """`--expert b=<adapter>` (a spoiled copy with `how`)."""
    folder = copy_of(world, tmp, name, how) if how else world[name]
    return ["--expert", f"b={folder}"]


def yaml_file(tmp: Path, text: str) -> list[str]:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return ["--config", str(path)]


PROBES = [
    # --rank and --moe-modules
    ("rank-zero", lambda w, t: ["--rank", "0"], "invalid --rank (rank): Input should be greater than or equal to 1"),
    ("rank-text", lambda w, t: ["--rank", "big"], "invalid --rank (rank): Input should be a valid integer"),
    ("rank-and-sparsity", lambda w, t: ["--rank", "4", "--sparsity", "0.5"], "--rank 4 and --sparsity 0.5 are two ways to store task vectors compactly"),
    ("rank-and-ewemoe-sparsity", lambda w, t: ["--method", "e-wemoe", "--rank", "4", "--sparsity", "0.9"], "give one of them"),
    ("rank-static-method", lambda w, t: ["--method", "task-arithmetic", "--rank", "4"], "--rank does not apply to --method task-arithmetic"),
    ("rank-too-large", lambda w, t: ["--rank", "40"], "--rank 40 is larger than the routed tensor 'encoder.layers.0.mlp.fc1.weight' (64x32) allows: at most 32"),
    ("rank-too-large-attention", lambda w, t: ["--rank", "33", "--moe-modules", "q_proj"], "tensor 'encoder.layers.0.self_attn.q_proj.weight' (32x32) allows: at most 32"),
    ("modules-unknown", lambda w, t: ["--moe-modules", "q_proj,query"], "invalid --moe-modules (moe_modules): unknown module 'query'; routable modules are q_proj,k_proj,v_proj,out_proj,fc1,fc2"),
    ("modules-twice", lambda w, t: ["--moe-modules", "fc1", "--moe-modules", "fc1,fc2"], "module 'fc1' is named twice"),
    ("modules-empty", lambda w, t: ["--moe-modules", ","], "name at least one module"),
    ("modules-yaml-number", lambda w, t: yaml_file(t, "moe_modules: [q_proj, 3]\n"), "expected module names separated by commas"),
    ("modules-static-method", lambda w, t: ["--method", "ties", "--moe-modules", "fc1"], "--moe-modules does not apply to --method ties"),
    # LoRA experts
    ("lora-routes-nothing", lambda w, t: ["--expert", f"a={w['qv']}", *lora(w, t, "qv2")], "no expert changes the routed modules (fc1,fc2): the LoRA experts adapt q_proj,v_proj only; route those with --moe-modules q_proj,v_proj"),
    ("lora-sparsity", lambda w, t: [*lora(w, t, "fc"), "--sparsity", "0.5"], "--sparsity 0.5 does not apply to a merge with LoRA experts"),
    ("lora-ewemoe-sparsity", lambda w, t: [*lora(w, t, "fc"), "--method", "e-wemoe", "--sparsity", "0.9"], "does not apply to a merge with LoRA experts"),
    ("lora-rank-too-large", lambda w, t: lora(w, t, "wide-rank"), "expert 'b' has LoRA rank 40, larger than the routed tensor 'encoder.layers.0.mlp.fc1.weight' (64x32) can store"),
    ("lora-dora", lambda w, t: lora(w, t, "fc", "dora"), "uses DoRA (a learned magnitude per output row, not a low-rank delta)"),
    ("lora-other-peft-type", lambda w, t: lora(w, t, "fc", "loha"), "is a PEFT LOHA adapter; hf-wemoe reads LoRA adapters (peft_type LORA) only"),
    ("lora-no-weights", lambda w, t: lora(w, t, "fc", "no-weights"), "has adapter_config.json but no adapter weights (adapter_model.safetensors)"),
    ("lora-pickle-only", lambda w, t: lora(w, t, "fc", "pickle"), "only has pickle weights (adapter_model.bin); loading pickle can execute arbitrary code"),
    ("lora-malicious-pickle", lambda w, t: [*lora(w, t, "fc", "malicious-pickle"), "--allow-pickle"], "holds more than tensors, which torch.load(weights_only=True) refuses"),
    ("lora-other-base", lambda w, t: lora(w, t, "fc", "other-base"), "(base_model_name_or_path in its adapter_config.json), but --base is"),
    ("lora-other-architecture", lambda w, t: lora(w, t, "wide"), "has LoRA factors of shapes A (2, 48), B (64, 2) for 'encoder.layers.0.mlp.fc1'"),
    ("lora-module-not-in-base", lambda w, t: lora(w, t, "deep"), "adapts 'encoder.layers.3.mlp.fc1', which the base"),
    ("lora-unsupported-module", lambda w, t: lora(w, t, "conv"), "adapts 'embeddings.patch_embedding'; hf-wemoe routes LoRA on the vision encoder's q_proj, k_proj, v_proj, out_proj, fc1 and fc2 only"),
]  # fmt: skip


@pytest.mark.parametrize("spoil, fragment", [probe[1:] for probe in PROBES], ids=[probe[0] for probe in PROBES])
def test_bad_lora_merge_input(world, tmp_path, monkeypatch, capsys, spoil, fragment):
    monkeypatch.chdir(tmp_path)
    extra = spoil(world, tmp_path)
    before = entries(tmp_path)
    args = ["merge", "-q", "--base", str(world["base"])]
    if "--expert" not in extra or extra.count("--expert") == 1:
        args += ["--expert", f"a={world['task0']}"]
    message = run_error([*args, "--output", str(tmp_path / "merged"), *extra], capsys)
    assert fragment in message, message
    assert entries(tmp_path) == before, "a failed merge left files behind"
    assert not (tmp_path / "ran").exists(), "a pickle file ran code"
