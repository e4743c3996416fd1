"""PEFT LoRA adapters read as experts, checked against PEFT itself: every tensor of `AdapterSource.get` equals
PEFT's `merge_and_unload`, for every option hf-wemoe honours; every option it cannot honour is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import write_checkpoint
from hf_wemoe.errors import SourceError
from hf_wemoe.io.adapters import AdapterSource, check_adapter_base, open_adapter, open_expert, targets_module
from hf_wemoe.io.sources import ModelSource, open_source, parse_reference
from lora_adapters import edit_adapter_config, make_adapter, peft_merged, rename_adapter_keys
from tiny_models import make_base_and_experts

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# name -> (options of make_adapter, the adapted (layer, module) pairs PEFT makes of them on the 3-layer base)
VARIANTS = {
    "q-v": (dict(r=4, lora_alpha=8, target_modules=QV), {(i, m) for i in range(3) for m in QV}),
    "all-rslora": (
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=ALL),
        {(i, m) for i in range(3) for m in ALL},
    ),
    "regex": (
        dict(r=2, lora_alpha=4, target_modules=r".*layers\.[02]\.(self_attn\.k_proj|mlp\.fc1)"),
        {(0, "k_proj"), (0, "fc1"), (2, "k_proj"), (2, "fc1")},
    ),
    "layers": (
        dict(r=3, lora_alpha=3, target_modules=["out_proj", "fc2"], layers_to_transform=[1, 2]),
        {(1, "out_proj"), (1, "fc2"), (2, "out_proj"), (2, "fc2")},
    ),
    "layers-pattern": (
        dict(r=3, lora_alpha=5, target_modules=["fc1"], layers_to_transform=1, layers_pattern="layers"),
        {(1, "fc1")},
    ),
    "patterns": (
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "fc1"],
            rank_pattern={"fc1": 2, r"layers\.0\.self_attn\.q_proj": 6},
            alpha_pattern={"q_proj": 3},
        ),
        {(i, m) for i in range(3) for m in ("q_proj", "fc1")},
    ),
    "exclude": (
        dict(r=2, lora_alpha=2, target_modules=QV, exclude_modules=[r"layers.1.self_attn.v_proj"]),
        {(i, m) for i in range(3) for m in QV} - {(1, "v_proj")},
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base saved as a CLIPVisionModel and as a full CLIPModel, and adapters made by PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    base, _ = make_base_and_experts(num_experts=0, seed=0)
    folders = {
        "base": write_checkpoint(base, root / "base"),
        "clip": write_checkpoint(base, root / "clip", "clip"),
    }
    for seed, (name, (options, _)) in enumerate(VARIANTS.items(), start=1):
        folders[name] = make_adapter(folders["base"], root / name, seed=seed, **options)
    return root, folders


def adapted(source: AdapterSource) -> set[tuple[int, str]]:
    return {(module.layer, module.module) for module in source.modules.values()}


def assert_merges_like_peft(source: AdapterSource, reference: dict[str, torch.Tensor]) -> None:
    assert list(reference) == source.keys
    for key, tensor in reference.items():
        torch.testing.assert_close(source.get(key), tensor, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_adapter_merges_like_peft(world, variant):
    _, folders = world
    base = open_source(folders["base"])
    source = open_expert(str(folders[variant]), base)
    assert isinstance(source, AdapterSource)
    assert adapted(source) == VARIANTS[variant][1]
    assert_merges_like_peft(source, peft_merged(folders["base"], folders[variant]))
    assert source.base_check == "folder"  # PEFT recorded the base's folder as base_model_name_or_path


def test_factors_are_exact_and_carry_the_scaling(world):
    _, folders = world
    base = open_source(folders["base"])
    source = open_adapter(folders["patterns"], base)
    state = load_file(folders["patterns"] / "adapter_model.safetensors")
    prefix = "base_model.model.encoder.layers.0."
    for module, rank, scaling in (("mlp.fc1", 2, 8 / 2), ("self_attn.q_proj", 6, 3 / 6)):
        down, up = source.factors(f"encoder.layers.0.{module}.weight")
        assert down.shape[0] == up.shape[1] == rank
        expected = (
            scaling * state[f"{prefix}{module}.lora_B.weight"] @ state[f"{prefix}{module}.lora_A.weight"]
        )
        torch.testing.assert_close(up @ down, expected)
    assert source.factors("encoder.layers.0.self_attn.k_proj.weight") is None
    assert source.delta("encoder.layers.0.layer_norm1.weight") is None
    assert source.ranks == [2, 4, 6] and source.rank == 6 and source.targets == ["q_proj", "fc1"]


def test_rslora_scales_by_the_square_root_of_the_rank(world):
    _, folders = world
    source = open_adapter(folders["all-rslora"], open_source(folders["base"]))
    assert {module.scaling for module in source.modules.values()} == {6 / 2}


def test_fan_in_fan_out_is_off_for_linear_layers_as_in_peft(world, tmp_path):
    # PEFT switches fan_in_fan_out off for nn.Linear (the flag is for GPT-2's Conv1D) and uses the factors as
    # they are: an adapter_config.json that says true merges the same way.
    _, folders = world
    folder = Path(shutil.copytree(folders["q-v"], tmp_path / "fan"))
    edit_adapter_config(folder, fan_in_fan_out=True)
    source = open_adapter(folder, open_source(folders["base"]))
    assert_merges_like_peft(source, peft_merged(folders["base"], folder))


def test_adapters_saved_on_a_full_clip_or_its_vision_transformer(world, tmp_path):
    _, folders = world
    base = open_source(folders["clip"])  # the same vision tower, saved in a full CLIP checkpoint
    # On a full CLIPModel: q/v of both towers; the text tower's factors are not used.
    clip = make_adapter(folders["clip"], tmp_path / "clip", seed=11, r=2, lora_alpha=4, target_modules=QV)
    source = open_expert(str(clip), base)
    assert source.ignored_text_modules == 2 and adapted(source) == VARIANTS["q-v"][1]
    assert_merges_like_peft(source, peft_merged(folders["clip"], clip))
    # On the vision transformer of a CLIPModel (FusionBench's adapters on the Hub): no prefix at all.
    bare = make_adapter(
        folders["clip"], tmp_path / "bare", seed=12, on="vision_model", r=2, target_modules=QV
    )
    assert_merges_like_peft(
        open_expert(str(bare), base), peft_merged(folders["clip"], bare, on="vision_model")
    )
    # A CLIPVisionModel of transformers 4 (`vision_model.` prefix): the same factors read the same way.
    v4 = rename_adapter_keys(
        Path(shutil.copytree(folders["q-v"], tmp_path / "v4")),
        "base_model.model.",
        "base_model.model.vision_model.",
    )
    v4_source = open_expert(str(v4), open_source(folders["base"]))
    assert_merges_like_peft(v4_source, peft_merged(folders["base"], folders["q-v"]))


def test_pickle_adapters_need_allow_pickle(world, tmp_path):
    _, folders = world
    folder = Path(shutil.copytree(folders["q-v"], tmp_path / "pickled"))
    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    base = open_source(folders["base"])
    with pytest.raises(SourceError, match=r"only has pickle weights \(adapter_model.bin\).*--allow-pickle"):
        open_expert(str(folder), base)
    source = open_expert(str(folder), base, allow_pickle=True)
    assert_merges_like_peft(source, peft_merged(folders["base"], folders["q-v"]))


def test_targets_module_follows_peft():
    settings = {"target_modules": ["q_proj", "mlp.fc1"], "layers_to_transform": None}
    assert targets_module(settings, "encoder.layers.0.self_attn.q_proj")
    assert targets_module(settings, "encoder.layers.0.mlp.fc1")
    assert not targets_module(settings, "encoder.layers.0.self_attn.k_proj")
    assert not targets_module(settings, "encoder.layers.0.mlp")
    layered = {"target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert targets_module(layered, "vision_model.encoder.layers.1.self_attn.q_proj")
    assert not targets_module(layered, "vision_model.encoder.layers.0.self_attn.q_proj")
    # A module named in full is adapted whatever the layer options say, as in PEFT.
    full = {"target_modules": ["encoder.layers.0.self_attn.q_proj"], "layers_to_transform": [1]}
    assert targets_module(full, "encoder.layers.0.self_attn.q_proj")
    regex = {"target_modules": r".*\.(q|v)_proj", "exclude_modules": r".*layers\.2\..*"}
    assert targets_module(regex, "encoder.layers.1.self_attn.v_proj")
    assert not targets_module(regex, "encoder.layers.2.self_attn.v_proj")


def _base_named(text: str, folder: Path) -> ModelSource:
    """A base source as `open_source` makes it, under another reference (a Hub id or another folder)."""
    source = open_source(folder)
    reference = parse_reference(text) if "/" in text and not Path(text).exists() else source.reference
    return ModelSource(
        reference=reference,
        folder=source.folder,
        config=source.config,
        layout=source.layout,
        commit=source.commit,
        weight_files=source.weight_files,
    )


def test_what_counts_as_the_same_base(world, tmp_path):
    _, folders = world
    hub_base = _base_named("openai/clip-vit-base-patch16@main", folders["base"])
    assert check_adapter_base("openai/clip-vit-base-patch16", hub_base, "a") == "hub repo"
    assert check_adapter_base("OpenAI/CLIP-ViT-Base-Patch16", hub_base, "a") == "hub repo"
    with pytest.raises(SourceError) as err:
        check_adapter_base("openai/clip-vit-base-patch32", hub_base, "a")
    assert "trained on 'openai/clip-vit-base-patch32'" in str(err.value)
    assert "--base is 'openai/clip-vit-base-patch16@main'" in str(err.value)
    local = open_source(folders["base"])
    assert check_adapter_base(str(folders["base"]), local, "a") == "folder"
    with pytest.raises(SourceError, match="was trained on"):
        check_adapter_base(str(folders["clip"]), local, "a")
    # What cannot be compared: no name, a folder of another machine, a Hub id against a local folder.
    assert check_adapter_base(None, local, "a") == "shapes"
    assert check_adapter_base("/home/someone/clip", local, "a") == "shapes"
    assert check_adapter_base("openai/clip-vit-base-patch16", local, "a") == "shapes"
    # A snapshot folder of the Hugging Face cache is its repo.
    snapshot = tmp_path / "models--openai--clip-vit-base-patch16" / "snapshots" / ("0" * 40)
    shutil.copytree(folders["base"], snapshot)
    assert check_adapter_base("openai/clip-vit-base-patch16", open_source(snapshot), "a") == "hub repo"


# ----------------------------------------------------------------------------------------------------------------
# Refused adapters


def spoil(folders: dict[str, Path], tmp: Path, how: str) -> Path:
    """A copy of the q/v adapter, spoiled in one way."""
    folder = Path(shutil.copytree(folders["q-v"], tmp / how))
    weights = folder / "adapter_model.safetensors"
    if how == "no-weights":
        weights.unlink()
    elif how == "no-lora-b":
        state = load_file(weights)
        del state["base_model.model.encoder.layers.1.self_attn.v_proj.lora_B.weight"]
        save_file(state, weights)
    elif how == "rank":
        edit_adapter_config(folder, r=5)
    elif how == "targets":
        edit_adapter_config(folder, target_modules=["q_proj"])
    elif how == "more-targets":
        edit_adapter_config(folder, target_modules=["q_proj", "v_proj", "k_proj"])
    elif how == "nothing-targeted":
        edit_adapter_config(folder, target_modules=["query", "value"])
    elif how == "nan":
        state = load_file(weights)
        state["base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
        save_file(state, weights)
    elif how == "int-factors":
        state = load_file(weights)
        key = "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        state[key] = state[key].view(torch.int32)
        save_file(state, weights)
    elif how == "extra-tensor":
        state = load_file(weights)
        state["base_model.model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
        save_file(state, weights)
    elif how == "not-peft":
        state = load_file(weights)
        save_file({key.removeprefix("base_model.model."): value for key, value in state.items()}, weights)
    elif how == "other-base-name":
        edit_adapter_config(folder, base_model_name_or_path=str(folders["clip"]))
    elif how == "bad-json":
        (folder / "adapter_config.json").write_text("{not json")
    elif how == "bad-r":
        edit_adapter_config(folder, r="sixteen")
    elif how in ("dora", "ia3", "bias", "lora-bias", "modules-to-save", "pissa", "target-parameters"):
        edit_adapter_config(
            folder,
            **{
                "dora": {"use_dora": True},
                "ia3": {"peft_type": "IA3"},
                "bias": {"bias": "all"},
                "lora-bias": {"lora_bias": True},
                "modules-to-save": {"modules_to_save": ["post_layernorm"]},
                "pissa": {"init_lora_weights": "pissa_niter_4"},
                "target-parameters": {"target_parameters": ["encoder.layers.0.mlp.fc1.weight"]},
            }[how],
        )
    else:
        raise ValueError(how)
    return folder


REFUSED = {
    "no-weights": "has adapter_config.json but no adapter weights (adapter_model.safetensors)",
    "no-lora-b": "has no lora_B factor for 'encoder.layers.1.self_attn.v_proj'",
    "rank": "has rank-4 factors for 'encoder.layers.0.self_attn.q_proj', but its adapter_config.json says r=5",
    "targets": "has LoRA factors for 'encoder.layers.0.self_attn.v_proj', which its target options",
    "more-targets": "targets 'encoder.layers.0.self_attn.k_proj' but has no LoRA factors for it",
    "nothing-targeted": "has LoRA factors for 'encoder.layers.0.self_attn.q_proj', which its target options",
    "nan": "LoRA factor 'base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight' of '",
    "int-factors": "as torch.int32; LoRA factors are floating-point tensors",
    "extra-tensor": "holds 'encoder.layers.0.self_attn.q_proj.lora_magnitude_vector', which is not a LoRA factor",
    "not-peft": "which is not a PEFT adapter weight ('base_model.model....')",
    "other-base-name": "(base_model_name_or_path in its adapter_config.json), but --base is",
    "bad-json": "cannot read adapter_config.json of",
    "bad-r": "has r='sixteen'; expected a positive integer",
    "dora": "uses DoRA (a learned magnitude per output row, not a low-rank delta)",
    "ia3": "is a PEFT IA3 adapter; hf-wemoe reads LoRA adapters (peft_type LORA) only",
    "bias": "uses trained biases (bias='all')",
    "lora-bias": "uses LoRA on the biases (lora_bias)",
    "modules-to-save": "uses fully trained extra modules (modules_to_save)",
    "pissa": "init_lora_weights='pissa_niter_4', which changes the base weights",
    "target-parameters": "uses LoRA on parameters instead of modules (target_parameters)",
}


@pytest.mark.parametrize("how", list(REFUSED))
def test_refused_adapters(world, tmp_path, how):
    _, folders = world
    folder = spoil(folders, tmp_path, how)
    base = open_source(folders["base"])
    with pytest.raises(SourceError) as err:
        source = open_expert(str(folder), base)
        source.factors("encoder.layers.0.self_attn.q_proj.weight")  # NaN factors are found when read
    message = str(err.value)
    assert REFUSED[how] in message and "\n" not in message, message


def test_adapters_for_another_model_are_refused(world, tmp_path):
    _, folders = world
    base = open_source(folders["base"])
    # Another architecture (wider layers), made without recording a base name: the shapes tell.
    wide = write_checkpoint(make_base_and_experts(0, seed=1, hidden_size=48)[0], tmp_path / "wide")
    adapter = make_adapter(wide, tmp_path / "wide-lora", seed=3, r=2, target_modules=QV)
    edit_adapter_config(adapter, base_model_name_or_path=None)
    with pytest.raises(
        SourceError, match=r"has LoRA factors of shapes A \(2, 48\), B \(48, 2\) for 'encoder"
    ):
        open_expert(str(adapter), base)
    # A deeper model: a layer the base does not have.
    deep = write_checkpoint(make_base_and_experts(0, seed=1, num_hidden_layers=4)[0], tmp_path / "deep")
    adapter = make_adapter(deep, tmp_path / "deep-lora", seed=3, r=2, target_modules=["fc1"])
    edit_adapter_config(adapter, base_model_name_or_path=None)
    with pytest.raises(
        SourceError, match="adapts 'encoder.layers.3.mlp.fc1', which the base '.*' does not have"
    ):
        open_expert(str(adapter), base)
    # LoRA outside the routable linear layers: the patch embedding (a Conv2d PEFT can adapt), the projection.
    conv = make_adapter(
        folders["base"], tmp_path / "conv", seed=4, r=2, target_modules=["patch_embedding", "q_proj"]
    )
    with pytest.raises(
        SourceError, match="adapts 'embeddings.patch_embedding'; hf-wemoe routes LoRA on the vision"
    ):
        open_expert(str(conv), base)
    clip = open_source(folders["clip"])
    projection = make_adapter(
        folders["clip"], tmp_path / "proj", seed=5, r=2, target_modules=["visual_projection"]
    )
    with pytest.raises(SourceError, match="adapts 'visual_projection'; hf-wemoe routes LoRA on"):
        open_expert(str(projection), clip)
    text = make_adapter(
        folders["clip"], tmp_path / "text", seed=6, r=2, target_modules=r"text_model.*\.q_proj"
    )
    with pytest.raises(SourceError, match="holds LoRA factors of the text tower only"):
        open_expert(str(text), clip)


def test_an_adapter_config_without_targets_is_refused(world, tmp_path):
    _, folders = world
    folder = Path(shutil.copytree(folders["q-v"], tmp_path / "none"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="names no target_modules"):
        open_expert(str(folder), open_source(folders["base"]))
