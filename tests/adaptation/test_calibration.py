"""Router calibration (`hf_wemoe.calibration`, `hf-wemoe calibrate`, `hf-wemoe merge --calibrate`): each task's
held-out images route to its expert, deterministically, touching only the routers; bad input is one line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, CLIPVisionModel

from adaptation_fixtures import CLASSNAMES, make_adaptation_world
from bad_input import run_error
from hf_wemoe import build_wemoe
from hf_wemoe.calibration import calibrate_routers
from hf_wemoe.cli.main import main
from hf_wemoe.errors import WEMoEError
from hf_wemoe.models.modeling_wemoe import is_router_parameter
from hf_wemoe.zeroshot.classifier import load_image_processor
from hf_wemoe.zeroshot.data import ImageClassificationDataset, load_task_dataset

TASKS = tuple(CLASSNAMES)  # blocks, stripes: the experts of the world share the tasks' names

# Measured on this world (16 calibration images per task, 24 held-out ones): the own expert's mean weight is
# 0.99-1.00 and the other's 0.00-0.01 for depth 1, depth 2 and a shared router; the bounds leave a wide margin.
OWN_AT_LEAST, OTHER_AT_MOST = 0.8, 0.2


@dataclass
class Task:
    name: str
    dataset: Any


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = make_adaptation_world(tmp_path_factory.mktemp("calibration-world"))
    processor = load_image_processor(str(world["clip"]))
    splits = {
        split: [
            Task(name, ImageClassificationDataset(load_task_dataset(f"{world[name]}#{split}"), processor))
            for name in TASKS
        ]
        for split in ("train", "test")
    }
    base = CLIPVisionModel.from_pretrained(world["clip"])
    folders = {name: world["wemoe"].parent / f"expert-{name}" for name in TASKS}
    experts = {name: CLIPVisionModel.from_pretrained(folder) for name, folder in folders.items()}
    return {**world, "tasks": splits, "base": base, "experts": experts, "expert_folders": folders}


def fresh(world, **options):
    return build_wemoe(world["base"], world["experts"], **options).eval()


def mean_routing(model, tasks) -> dict[str, list[float]]:
    """Per task: the routing weights of its images averaged over images and MoE layers."""
    out = {}
    with torch.no_grad():
        for task in tasks:
            pixels = torch.stack([task.dataset[i]["pixel_values"] for i in range(len(task.dataset))])
            routing = model(pixels, output_routing_weights=True).routing_weights
            out[task.name] = torch.stack(routing).mean(dim=(0, 1)).tolist()
    return out


def assert_routes_to_own_expert(routing: dict[str, list[float]]) -> None:
    for name, weights in routing.items():
        own = TASKS.index(name)
        assert weights[own] > OWN_AT_LEAST, routing
        assert all(w < OTHER_AT_MOST for k, w in enumerate(weights) if k != own), routing


@pytest.mark.parametrize(
    "options",
    [
        {"router_depth": 1},
        {"router_depth": 2},
        {"router_depth": 2, "shared_router": True},
        # Routers that read attention's input (routed q/v projections), and low-rank task vectors.
        {"router_depth": 2, "moe_modules": ["q_proj", "v_proj", "fc1", "fc2"]},
        {"router_depth": 2, "moe_modules": ["q_proj", "v_proj"], "shared_router": True},
        {"router_depth": 2, "rank": 4},
    ],
    ids=["depth1", "depth2", "shared", "attention+mlp", "attention-shared", "rank4"],
)
def test_held_out_images_route_to_their_expert(world, options):
    model = fresh(world, **options)
    before = mean_routing(model, world["tasks"]["test"])
    assert all(abs(w - model.config.scaling) < 0.1 for ws in before.values() for w in ws)  # task arithmetic
    summary = calibrate_routers(model, world["tasks"]["train"], images_per_task=16, progress=False)
    assert summary.layers == len(model.config.moe_layer_indices) and summary.images_per_task == dict.fromkeys(TASKS, 16)
    assert summary.routing_accuracy == 1.0 and summary.own_weight > OWN_AT_LEAST
    assert_routes_to_own_expert(mean_routing(model, world["tasks"]["test"]))
    assert "route to their task's expert" in summary.line() and summary.to_dict()["tasks"] == list(TASKS)


def test_deterministic_and_only_routers_change(world):
    first, second = fresh(world), fresh(world)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    for model in (first, second):
        calibrate_routers(model, world["tasks"]["train"], images_per_task=8, seed=3, progress=False)
    after, again = first.state_dict(), second.state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)  # bit-identical
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_router_parameter(k) for k in changed)
    assert all(".router.output." in k for k in changed)  # the depth-2 hidden layers keep their values
    other_seed = fresh(world)
    calibrate_routers(other_seed, world["tasks"]["train"], images_per_task=8, seed=4, progress=False)
    assert not all(torch.equal(after[k], other_seed.state_dict()[k]) for k in changed)


@pytest.mark.parametrize(
    "options, tasks, images, message",
    [
        ({"router_depth": 0}, TASKS, 8, "needs router_depth 1 or 2"),
        ({}, ("blocks", "nope"), 8, "'nope' is not an expert of the model; name each task after"),
        ({}, TASKS, 65, "images per task must be 1 to 64"),
    ],
    ids=["depth-0", "not-an-expert", "too-many-images"],
)
def test_refusals_are_one_line(world, options, tasks, images, message):
    model = fresh(world, **options)
    data = [Task(name, world["tasks"]["train"][0].dataset) for name in tasks]
    with pytest.raises(WEMoEError, match=message) as raised:
        calibrate_routers(model, data, images_per_task=images, progress=False)
    assert "\n" not in str(raised.value)


def calibrate_args(world, output, *extra):
    return [
        "calibrate",
        "--model", str(world["wemoe"]),
        "--task", f"blocks={world['blocks']}#train",
        "--task", f"stripes={world['stripes']}#train",
        "--templates", "generic",
        "--calibration-images", "16",
        "--quiet",
        "--output", str(output),
        *extra,
    ]  # fmt: skip


def test_calibrate_command_end_to_end(world, tmp_path, capsys):
    output = tmp_path / "calibrated"
    assert main(calibrate_args(world, output)) == 0
    printed = capsys.readouterr().out
    assert "route to their task's expert" in printed and "| before calibration |" in printed
    results = json.loads((output / "eval_results.json").read_text())
    assert results["baselines"][0]["name"] == "before calibration"
    config = json.loads((output / "config.json").read_text())
    recorded = config["provenance"]["calibration"]
    assert recorded["images_per_task"] == 16 and recorded["tasks"]["blocks"] == f"{world['blocks']}#train"
    before, after = load_file(world["wemoe"] / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_router_parameter(k) for k in changed)
    assert_routes_to_own_expert(mean_routing(AutoModel.from_pretrained(output), world["tasks"]["test"]))


def merge_args(world, output, *extra):
    experts = [arg for name in TASKS for arg in ("--expert", f"{name}={world['expert_folders'][name]}")]
    return ["merge", "-q", "--base", str(world["clip"]), *experts, "--output", str(output), *extra]


def test_merge_calibrate_changes_only_the_routers(world, tmp_path, capsys):
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    calibrate = [arg for name in TASKS for arg in ("--calibrate", f"{name}={world[name]}#train")]
    assert main(merge_args(world, plain, "--router-depth", "1")) == 0
    assert (
        main(merge_args(world, calibrated, "--router-depth", "1", *calibrate, "--calibration-images", "16"))
        == 0
    )
    assert "route to their task's expert" in capsys.readouterr().out
    before, after = load_file(plain / "model.safetensors"), load_file(calibrated / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_router_parameter(k) for k in changed)
    config = json.loads((calibrated / "config.json").read_text())
    assert config["provenance"]["calibration"]["images_per_task"] == 16
    assert "recipe" in config["provenance"]  # the merge's provenance is kept
    model = AutoModel.from_pretrained(calibrated)
    assert_routes_to_own_expert(mean_routing(model, world["tasks"]["test"]))


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("calibrate", [], "dataset path not found"),
        ("merge", [], "dataset path not found"),
        ("merge", ["--method", "task-arithmetic"], "writes a static model without routers"),
        ("merge", ["--router-depth", "0"], "needs router_depth 1 or 2"),
        ("merge", ["--calibrate", "other=x"], "'other' is not an expert"),
    ],
    ids=["calibrate-bad-dataset", "merge-bad-dataset", "static-method", "depth-0", "not-an-expert"],
)
def test_bad_input_exits_2_and_leaves_no_output(world, tmp_path, capsys, command, extra, message):
    output = tmp_path / "out"
    if command == "calibrate":
        args = calibrate_args(world, output)
        args[args.index("--task") + 1] = f"blocks={tmp_path / 'missing'}"
    else:
        args = merge_args(world, output, "--calibrate", f"blocks={tmp_path / 'missing'}", *extra)
    assert message in run_error(args, capsys)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
