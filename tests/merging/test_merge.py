"""`hf-wemoe merge` from local folders: formulas against slow references, layouts, recipes, cards, bad input.

The command line runs in-process here (`hf_wemoe.cli.main`); `test_merge_hub.py` runs it in subprocesses against
the local Hub server.
"""

from __future__ import annotations

import copy as copy_module
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModel

from checkpoints import write_checkpoint
from hf_wemoe import WEMoECLIPVisionModel, build_wemoe
from hf_wemoe.cli.main import main
from hf_wemoe.cli.merge import MergeRunOptions
from hf_wemoe.io.weights import count_parameters
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.merging.registry import merge_methods
from hf_wemoe.models.modeling_wemoe import is_router_parameter
from hf_wemoe.workflows.merge import run_merge
from tiny_models import make_base_and_experts

NUM_EXPERTS = 3
NAMES = [f"task{k}" for k in range(NUM_EXPERTS)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base and experts in memory and on disk (v5 layout; the base with a preprocessor config)."""
    root = tmp_path_factory.mktemp("zoo")
    base, experts = make_base_and_experts(num_experts=NUM_EXPERTS, seed=0)
    folders = {"base": write_checkpoint(base, root / "base")}
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folders["base"])
    for name, expert in experts.items():
        folders[name] = write_checkpoint(expert, root / name)
    return base, experts, folders


def merge_args(zoo, output: Path, *extra: str, base: str | None = None) -> list[str]:
    _, _, folders = zoo
    args = ["merge", "--base", base or str(folders["base"]), "--output", str(output), "--quiet"]
    for name in NAMES:
        args += ["--expert", f"{name}={folders[name]}"]
    return [*args, *extra]


def run_ok(args: list[str]) -> None:
    assert main(args) == 0


def run_error(args: list[str], capsys) -> str:
    """Run a command that must fail: exit code 2 and a one-line `error:` message; returns the message."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def assert_nothing_written(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before, "a failed merge left files behind"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder (single file or shards)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Slow, obviously correct references over whole state dicts.


def states(zoo) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base, experts, _ = zoo
    return base.state_dict(), [experts[name].state_dict() for name in NAMES]


def reference_task_arithmetic(zoo, scaling: float) -> dict[str, torch.Tensor]:
    theta0, thetas = states(zoo)
    return {key: theta0[key] + scaling * sum(theta[key] - theta0[key] for theta in thetas) for key in theta0}


def reference_average(zoo) -> dict[str, torch.Tensor]:
    _, thetas = states(zoo)
    return {key: sum(theta[key] for theta in thetas) / len(thetas) for key in thetas[0]}


def reference_ties(zoo, scaling: float, keep: float) -> dict[str, torch.Tensor]:
    theta0, thetas = states(zoo)
    keys = list(theta0)
    flat0 = torch.cat([theta0[key].reshape(-1) for key in keys]).double()
    trimmed = []
    for theta in thetas:
        tau = torch.cat([theta[key].reshape(-1) for key in keys]).double() - flat0
        kept = math.ceil(keep * tau.numel())
        threshold = tau.abs().sort(descending=True).values[kept - 1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0))
    trimmed = torch.stack(trimmed)
    sign = torch.sign(trimmed.sum(dim=0))
    merged = torch.zeros_like(flat0)
    for i in range(flat0.numel()):
        agreeing = [
            value for value in trimmed[:, i].tolist() if value != 0 and math.copysign(1, value) == sign[i]
        ]
        merged[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    merged = flat0 + scaling * merged
    out, offset = {}, 0
    for key in keys:
        numel = theta0[key].numel()
        out[key] = merged[offset : offset + numel].view(theta0[key].shape).float()
        offset += numel
    return out


# ----------------------------------------------------------------------------------------------------------------
# WEMoE


@pytest.fixture(scope="module")
def wemoe_output(zoo, tmp_path_factory):
    output = tmp_path_factory.mktemp("wemoe") / "merged"
    run_ok(merge_args(zoo, output))
    return output


def test_wemoe_merge_follows_the_method(zoo, wemoe_output):
    base, experts, _ = zoo
    model = WEMoECLIPVisionModel.from_pretrained(wemoe_output)
    assert model.config.expert_names == NAMES
    state = model.state_dict()
    theta0, thetas = states(zoo)
    arithmetic = reference_task_arithmetic(zoo, 0.3)
    for key in theta0:
        if ".mlp." in key:
            # The pretrained MLP, not the task-arithmetic one.
            assert torch.equal(state[key], theta0[key]), key
            layer, name = key.split(".mlp.")
            stacked = torch.stack([theta[key] - theta0[key] for theta in thetas])
            torch.testing.assert_close(state[f"{layer}.mlp.task_vectors.{name.replace('.', '_')}"], stacked)
        else:
            torch.testing.assert_close(state[key], arithmetic[key], rtol=1e-6, atol=1e-7)
    # Collapsing with a one-hot routing gives expert k's MLP back exactly.
    for k, name in enumerate(NAMES):
        static = model.collapse(torch.eye(NUM_EXPERTS)[k]).state_dict()
        for key, tensor in experts[name].state_dict().items():
            if ".mlp." in key:
                assert torch.equal(static[key], tensor), (name, key)
    # The streaming merge builds exactly what the in-memory `build_wemoe` builds (same seed).
    reference = build_wemoe(base, experts, seed=0).state_dict()
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


def test_wemoe_output_folder(zoo, wemoe_output):
    files = {path.name for path in wemoe_output.iterdir()}
    assert files == {
        "config.json",
        "model.safetensors",
        "configuration_wemoe.py",
        "modeling_wemoe.py",
        "wemoe_ops.py",
        "preprocessor_config.json",
        "merge_config.yaml",
        "README.md",
    }
    config = json.loads((wemoe_output / "config.json").read_text())
    assert config["model_type"] == "wemoe_clip_vision_model"
    assert config["auto_map"]["AutoModel"] == "modeling_wemoe.WEMoECLIPVisionModel"
    _, _, folders = zoo
    assert config["base_model_ref"] == str(folders["base"])
    assert config["expert_refs"] == [str(folders[name]) for name in NAMES]
    provenance = config["provenance"]
    assert provenance["base"]["source"] == "local"
    assert len(provenance["base"]["content_sha256"]) == 64
    assert list(provenance["experts"]) == NAMES
    assert provenance["recipe"]["method"] == "wemoe" and provenance["recipe"]["seed"] == 0
    assert (wemoe_output / "preprocessor_config.json").read_text() == (
        folders["base"] / "preprocessor_config.json"
    ).read_text()
    recipe = yaml.safe_load((wemoe_output / "merge_config.yaml").read_text())
    assert recipe == {
        "base": str(folders["base"]),
        "experts": {name: str(folders[name]) for name in NAMES},
        "method": "wemoe",
        "scaling": 0.3,
        "router_depth": 2,
        "sparsity": 0.0,
        "shared_router": False,
        "routing": "sample",
        "task_vector_dtype": "float32",
        "seed": 0,
        "max_shard_size": "5GB",
    }


def test_wemoe_model_card(wemoe_output):
    card = ModelCard.load(wemoe_output / "README.md")
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "wemoe" in card.data.tags
    counts = count_parameters(wemoe_output)
    model = WEMoECLIPVisionModel.from_pretrained(wemoe_output)
    assert counts["router"] == sum(p.numel() for p in model.router_parameters())
    assert counts["total"] == sum(t.numel() for t in model.state_dict().values())
    for text in (
        f"{counts['total']:,}",
        f"{counts['router']:,}",
        *NAMES,
        "trust_remote_code=True",
        "collapse(",
    ):
        assert text in card.text, text


def test_recipe_rebuilds_identical_weights(zoo, wemoe_output, tmp_path):
    run_ok(
        [
            "merge",
            "--config",
            str(wemoe_output / "merge_config.yaml"),
            "--output",
            str(tmp_path / "again"),
            "-q",
        ]
    )
    for name in ("model.safetensors", "merge_config.yaml"):
        assert (tmp_path / "again" / name).read_bytes() == (wemoe_output / name).read_bytes(), name
    # The seed is what makes it reproducible: another seed gives other routers, same everything else.
    run_ok(merge_args(zoo, tmp_path / "seed1", "--seed", "1"))
    first, other = weights(wemoe_output), weights(tmp_path / "seed1")
    for key in first:
        randomly_initialised = is_router_parameter(key) and key.endswith(".weight")  # biases start at 0 and lambda
        assert torch.equal(first[key], other[key]) != randomly_initialised, key


def test_e_wemoe_defaults_and_overrides(zoo, tmp_path):
    base, experts, _ = zoo
    run_ok(merge_args(zoo, tmp_path / "e", "--method", "e-wemoe"))
    model = WEMoECLIPVisionModel.from_pretrained(tmp_path / "e")
    assert model.config.sparsity == 0.9 and model.config.shared_router is True
    reference = build_wemoe(base, experts, seed=0, sparsity=0.9, shared_router=True).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert any(key.startswith("encoder.router.") for key in state)
    assert any(key.endswith("fc1_weight_values") for key in state)
    for key in reference:
        assert torch.equal(state[key], reference[key]), key

    run_ok(
        merge_args(
            zoo,
            tmp_path / "custom",
            *("--method", "e-wemoe", "--sparsity", "0.5", "--no-shared-router", "--task-vector-dtype", "bfloat16"),
            *("--router-depth", "1", "--routing", "batch", "--scaling", "0.25"),
        )
    )
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert config["sparsity"] == 0.5 and config["shared_router"] is False
    assert config["task_vector_dtype"] == "bfloat16" and config["router_depth"] == 1
    assert config["routing"] == "batch" and config["scaling"] == 0.25
    tensors = weights(tmp_path / "custom")
    assert tensors["encoder.layers.0.mlp.task_vectors.fc1_weight_values"].dtype == torch.bfloat16
    recipe = yaml.safe_load((tmp_path / "custom" / "merge_config.yaml").read_text())
    assert recipe["sparsity"] == 0.5 and recipe["shared_router"] is False and recipe["method"] == "e-wemoe"


def test_half_precision_checkpoints_keep_their_dtype(zoo, tmp_path):
    base, experts, _ = zoo
    half = {"base": _half(base), **{name: _half(experts[name]) for name in NAMES}}
    folders = {name: write_checkpoint(model, tmp_path / name) for name, model in half.items()}
    args = ["merge", "--base", str(folders["base"]), "-q", *[f"--expert={n}={folders[n]}" for n in NAMES]]
    run_ok([*args, "--output", str(tmp_path / "wemoe"), "--task-vector-dtype", "bfloat16"])
    merged = WEMoECLIPVisionModel.from_pretrained(tmp_path / "wemoe", dtype=torch.float16).state_dict()
    reference = build_wemoe(
        half["base"], {n: half[n] for n in NAMES}, task_vector_dtype="bfloat16"
    ).state_dict()
    for key in reference:
        assert merged[key].dtype == reference[key].dtype and torch.equal(merged[key], reference[key]), key
    stored = weights(tmp_path / "wemoe")
    assert stored["encoder.layers.0.mlp.task_vectors.fc1_weight"].dtype == torch.bfloat16
    assert (
        stored["encoder.layers.0.mlp.fc1.weight"].dtype
        == stored["embeddings.patch_embedding.weight"].dtype
        == torch.float16
    )
    run_ok([*args, "--output", str(tmp_path / "average"), "--method", "average"])
    assert all(t.dtype == torch.float16 for t in weights(tmp_path / "average").values())


def _half(model: CLIPVisionModel) -> CLIPVisionModel:
    copy = CLIPVisionModel(copy_module.deepcopy(model.config)).eval()
    copy.load_state_dict(model.state_dict())
    return copy.half()


# ----------------------------------------------------------------------------------------------------------------
# Static methods


@pytest.mark.parametrize(
    "method, extra, reference",
    [
        ("task-arithmetic", ("--scaling", "0.4"), lambda zoo: reference_task_arithmetic(zoo, 0.4)),
        ("average", (), reference_average),
        ("ties", (), lambda zoo: reference_ties(zoo, 0.3, 0.2)),
        ("ties", ("--ties-keep", "0.5", "--scaling", "1.0"), lambda zoo: reference_ties(zoo, 1.0, 0.5)),
    ],
)
def test_static_merges_match_their_formulas(zoo, tmp_path, method, extra, reference):
    output = tmp_path / "static"
    run_ok(merge_args(zoo, output, "--method", method, *extra))
    model, info = CLIPVisionModel.from_pretrained(output, output_loading_info=True)
    assert not any(info.values()), info
    expected = reference(zoo)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)
    # A plain CLIPVisionModel folder: no custom code, no auto_map.
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and "auto_map" not in config
    assert (
        config["architectures"] == ["CLIPVisionModel"] and config["provenance"]["recipe"]["method"] == method
    )
    assert not list(output.glob("*.py"))
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model_relation == "merge" and f"`{method}`" in card.text


def test_sharded_outputs_load(zoo, tmp_path):
    for method in ("wemoe", "task-arithmetic"):
        whole, sharded = tmp_path / f"{method}-whole", tmp_path / f"{method}-sharded"
        run_ok(merge_args(zoo, whole, "--method", method))
        run_ok(merge_args(zoo, sharded, "--method", method, "--max-shard-size", "50KB"))
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (sharded / "model.safetensors").exists()
        loader = WEMoECLIPVisionModel if method == "wemoe" else CLIPVisionModel
        first, second = (
            loader.from_pretrained(whole).state_dict(),
            loader.from_pretrained(sharded).state_dict(),
        )
        assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("method", ["wemoe", "ties"])
def test_v4_v5_and_full_clip_inputs_give_identical_results(zoo, tmp_path, method):
    base, experts, _ = zoo
    layouts = ["v4", "clip", "sharded"]
    mixed = {"base": write_checkpoint(base, tmp_path / "in" / "base", "v4")}
    for k, name in enumerate(NAMES):
        mixed[name] = write_checkpoint(experts[name], tmp_path / "in" / name, layouts[k % len(layouts)])
    run_ok(merge_args(zoo, tmp_path / "v5", "--method", method))
    args = [
        "merge",
        "--base",
        str(mixed["base"]),
        "--output",
        str(tmp_path / "mixed"),
        "-q",
        "--method",
        method,
    ]
    run_ok(args + [f"--expert={name}={mixed[name]}" for name in NAMES])
    assert not (tmp_path / "mixed" / "preprocessor_config.json").exists()  # this base has none
    first, second = weights(tmp_path / "v5"), weights(tmp_path / "mixed")
    assert first.keys() == second.keys()
    assert [key for key in first if not torch.equal(first[key], second[key])] == []
    layouts_seen = json.loads((tmp_path / "mixed" / "config.json").read_text())["provenance"]
    assert layouts_seen["base"]["layout"] == "clip_vision_prefixed"
    assert {record["layout"] for record in layouts_seen["experts"].values()} == {
        "clip_vision_prefixed",
        "clip",
        "clip_vision",
    }


# ----------------------------------------------------------------------------------------------------------------
# Options: flags, YAML, help


def test_config_file_and_flag_overrides(zoo, tmp_path):
    _, _, folders = zoo
    config = tmp_path / "recipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(folders["base"]),
                "experts": [f"{name}={folders[name]}" for name in NAMES],  # NAME=REF strings, like the flags
                "method": "task-arithmetic",
                "scaling": 0.5,
                "output": str(tmp_path / "from-file"),
            }
        )
    )
    run_ok(["merge", "--config", str(config), "--scaling", "0.2", "-q"])
    model = CLIPVisionModel.from_pretrained(tmp_path / "from-file")
    expected = reference_task_arithmetic(zoo, 0.2)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)
    # Experts given as flags replace the file's.
    run_ok(
        [
            *("merge", "--config", str(config), "--output", str(tmp_path / "one"), "-q"),
            f"--expert=only={folders['task1']}",
        ]
    )
    assert yaml.safe_load((tmp_path / "one" / "merge_config.yaml").read_text())["experts"] == {
        "only": str(folders["task1"])
    }


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = [*MergeRecipe.model_fields, *MergeRunOptions.model_fields]
    for name in fields:
        flag = "--expert" if name == "experts" else "--" + name.replace("_", "-")
        assert flag in text, flag
    for method in merge_methods():
        assert method in text
    for snippet in (
        "--config FILE.yaml",
        "(default: 0.3)",
        "(default: 0.2)",
        "(default: 0.0 for wemoe, 0.9 for e-wemoe)",
    ):
        assert snippet in text, snippet
    assert text.count("(default:") + text.count("(required") >= len(fields)


def test_progress_and_summary(zoo, tmp_path, capsys):
    _, _, folders = zoo
    recipe = MergeRecipe(base=str(folders["base"]), experts={name: str(folders[name]) for name in NAMES})
    capsys.readouterr()
    summary = run_merge(recipe, tmp_path / "out", show_progress=True)
    assert "wemoe" in capsys.readouterr().err  # the progress bar
    line = summary.line()
    assert "\n" not in line
    for text in ("wemoe", "3 experts", f"{summary.parameters:,} parameters", "on disk", "s"):
        assert text in line
    assert summary.parameters == count_parameters(tmp_path / "out")["total"]
    capsys.readouterr()
    assert main(merge_args(zoo, tmp_path / "out2")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("merged 3 experts")


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one-line error, exit code 2, nothing written


def test_bad_input_is_refused_cleanly(zoo, tmp_path, capsys):
    base, experts, folders = zoo
    parent = tmp_path / "outputs"
    parent.mkdir()
    output = parent / "merged"
    before = {p.name for p in parent.iterdir()}
    common = ["merge", "--base", str(folders["base"]), "--output", str(output), "-q"]

    message = run_error(common, capsys)
    assert "no experts" in message
    message = run_error([*common, f"--expert=a={folders['task0']}", f"--expert=a={folders['task1']}"], capsys)
    assert "'a' is given twice" in message
    message = run_error([*common, "--expert", "no-equals-sign"], capsys)
    assert "NAME=REF" in message
    message = run_error([*common, f"--expert=a={tmp_path / 'missing'}"], capsys)
    assert "missing" in message and "neither an existing local folder nor a Hub repo id" in message
    message = run_error(
        [*common, f"--expert=a={folders['task0']}", "--method", "average", "--scaling", "0.5"], capsys
    )
    assert "--scaling does not apply to --method average" in message
    message = run_error([*common, f"--expert=a={folders['task0']}", "--sparsity", "1.5"], capsys)
    assert "--sparsity" in message

    # Experts that do not match the base: the message names the tensor (or the config field).
    wider, _ = make_base_and_experts(num_experts=0, intermediate_size=48)
    deeper, _ = make_base_and_experts(num_experts=0, num_hidden_layers=4)
    other_act, _ = make_base_and_experts(num_experts=0, hidden_act="gelu")
    mismatched = {
        "wider": (wider, "tensor 'encoder.layers.0.mlp.fc1.weight' has shape (48, 32)"),
        "deeper": (deeper, "has tensor 'encoder.layers.3.self_attn.k_proj.weight' that the base lacks"),
        "other-act": (other_act, "hidden_act='gelu'"),
    }
    for name, (model, expected) in mismatched.items():
        folder = write_checkpoint(model, tmp_path / name)
        message = run_error([*common, f"--expert=a={folders['task0']}", f"--expert={name}={folder}"], capsys)
        assert expected in message and f"expert '{name}'" in message, message

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["task0"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = run_error([*common, f"--expert=a={corrupt}"], capsys)
    assert "corrupt" in message

    pickled = write_checkpoint(experts["task0"], tmp_path / "pickled", "pickle")
    message = run_error([*common, f"--expert=a={pickled}"], capsys)
    assert "--allow-pickle" in message
    assert_nothing_written(parent, before)
    run_ok([*common, f"--expert=a={pickled}", "--allow-pickle"])
    reference = build_wemoe(base, {"a": experts["task0"]}, seed=0).state_dict()
    merged = WEMoECLIPVisionModel.from_pretrained(output).state_dict()
    assert all(torch.equal(merged[key], reference[key]) for key in reference)

    # An existing output is kept unless --overwrite is given; with it, it is replaced.
    before = {p.name for p in parent.iterdir()}
    stamp = (output / "config.json").read_bytes()
    message = run_error([*common, f"--expert=a={folders['task1']}"], capsys)
    assert "already exists" in message and "--overwrite" in message
    assert (output / "config.json").read_bytes() == stamp
    run_ok([*common, f"--expert=b={folders['task1']}", "--overwrite"])
    assert json.loads((output / "config.json").read_text())["expert_names"] == ["b"]
    assert_nothing_written(parent, before)
    message = run_error(
        [
            "merge",
            "--base",
            str(output),
            f"--expert=a={folders['task0']}",
            "--output",
            str(output),
            "--overwrite",
        ],
        capsys,
    )
    assert "would replace the model folder" in message


def test_bad_config_files(zoo, tmp_path, capsys):
    _, _, folders = zoo
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(
        f"base: {folders['base']}\nexperts:\n  a: {folders['task0']}\n  a: {folders['task1']}\n"
    )
    assert "duplicate key 'a'" in run_error(
        ["merge", "--config", str(duplicate), "--output", str(tmp_path / "o")], capsys
    )
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"base: {folders['base']}\nexperts:\n  a: {folders['task0']}\nlambda: 0.3\n")
    assert "unknown option 'lambda'" in run_error(
        ["merge", "--config", str(unknown), "--output", str(tmp_path / "o")], capsys
    )
    assert "cannot read config file" in run_error(["merge", "--config", str(tmp_path / "none.yaml")], capsys)
    assert not (tmp_path / "o").exists()


def test_an_interrupted_merge_leaves_nothing_behind(zoo, tmp_path, monkeypatch, capsys):
    from hf_wemoe.merging import wemoe as upscale

    def interrupted(self, job, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(upscale.WEMoE, "write", interrupted)
    parent = tmp_path / "new" / "nested"
    assert main(merge_args(zoo, parent / "merged")) == 130
    assert not (tmp_path / "new").exists()
