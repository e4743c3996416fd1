"""`hf-wemoe train` / `hf-wemoe eval`: adaptation, exact resume, multi-process equivalence, outputs, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptation_fixtures import make_adaptation_world
from hf_wemoe.adaptation import stream_indices
from hf_wemoe.cli.main import main
from hf_wemoe.models.modeling_wemoe import is_router_parameter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_adaptation_world(tmp_path_factory.mktemp("adaptation-world"))


def train_args(world, output, *extra):
    return [
        "train",
        "--model", str(world["wemoe"]),
        "--task", f"blocks={world['blocks']}",
        "--task", f"stripes={world['stripes']}",
        "--templates", "generic",
        "--batch-size-per-task", "4",
        "--lr", "0.01",
        "--quiet",
        "--output", str(output),
        *extra,
    ]  # fmt: skip


def routers(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if is_router_parameter(k)}


def test_train_adapts_only_routers_and_writes_outputs(world, tmp_path, capsys):
    output = tmp_path / "adapted"
    assert main(train_args(world, output, "--steps", "4")) == 0
    printed = capsys.readouterr().out
    assert "| adapted | " in printed and "adapted routers for 4 steps" in printed
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_wemoe.py", "preprocessor_config.json"} <= files
    assert {"eval_results.json", "routing.png"} <= files
    before, after = load_file(world["wemoe"] / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_router_parameter(k) for k in changed)
    results = json.loads((output / "eval_results.json").read_text())
    assert set(results["accuracy"]) == {"blocks", "stripes"} and results["routing"] == "sample"
    assert results["num_examples"] == {"blocks": 24, "stripes": 24}
    config = json.loads((output / "config.json").read_text())
    assert config["provenance"]["adaptation"]["steps"] == 4


def test_entropy_decreases(world):
    from hf_wemoe.adaptation import TrainOptions, adapt_routers
    from hf_wemoe.workflows.tasks import load_tasks
    from hf_wemoe.workflows.train import TrainConfig

    config = TrainConfig(
        model=str(world["wemoe"]),
        task={"blocks": str(world["blocks"]), "stripes": str(world["stripes"])},
        templates=["generic"],
    )
    classifier, tasks, _ = load_tasks(config, require_labels=False)
    losses = []
    options = TrainOptions(steps=8, lr=0.01, batch_size_per_task=8, objective="entropy", routing_loss=0.0)
    adapt_routers(classifier, tasks, options, progress=False, on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_resume_continues_exactly(world, tmp_path):
    full = tmp_path / "full"
    assert main(train_args(world, full, "--steps", "6", "--no-evaluate")) == 0
    partial = tmp_path / "partial"
    checkpoints = tmp_path / "ckpt"
    assert (
        main(
            train_args(
                world,
                partial,
                "--steps",
                "3",
                "--save-every",
                "3",
                "--no-evaluate",
                "--checkpoint-dir",
                str(checkpoints),
            )
        )
        == 0
    )
    checkpoint = checkpoints / "step-3"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert size < 10 * (world["wemoe"] / "model.safetensors").stat().st_size / 10  # routers + optimizer only
    resumed = tmp_path / "resumed"
    assert (
        main(train_args(world, resumed, "--steps", "6", "--no-evaluate", "--resume-from", str(checkpoint)))
        == 0
    )
    a, b = routers(full), routers(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], routers(partial)[k]) for k in a)


@pytest.mark.parametrize(
    "objective",
    [["--objective", "entropy", "--routing-loss", "0"], ["--objective", "infomax", "--routing-loss", "1"]],
    ids=["entropy", "infomax+routing"],
)
def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path, objective):
    """The README's torchrun command on a machine without a GPU: one run over two processes (CPU DDP over gloo),
    not two independent runs racing on the output, also without ACCELERATE_USE_CPU."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    two = tmp_path / "two"
    args = train_args(world, two, "--steps", "3", "--no-evaluate", *objective)
    result = subprocess.run(
        [*torchrun, "-m", "hf_wemoe", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "1 process(es)" not in result.stdout
    assert result.stdout.count("saved to ") == 1  # only the main process writes and reports the output
    assert [path.name for path in tmp_path.iterdir()] == ["two"]  # one output, no staging folders left
    one = tmp_path / "one"
    assert main(train_args(world, one, "--steps", "3", "--no-evaluate", *objective)) == 0
    a, b, base = routers(one), routers(two), routers(world["wemoe"])
    for key in a:
        # Adam turns float-order noise in near-zero gradients into visible steps, so the updates are compared
        # relative to the largest one: a wrong reduction (e.g. per-process marginals) misses by whole steps.
        step_one, step_two = a[key] - base[key], b[key] - base[key]
        torch.testing.assert_close(step_two, step_one, atol=2e-2 * float(step_one.abs().max()) + 1e-7, rtol=0)
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_each_rank_takes_its_share_of_the_global_batch():
    global_batch = stream_indices(10, seed=3, task_index=1, start=16, count=8)
    assert global_batch[0::2] + global_batch[1::2] != global_batch  # interleaved shares
    assert sorted(global_batch[0::2] + global_batch[1::2]) == sorted(global_batch)
    # Positions 16..23 of a 10-sample stream: the end of epoch 1 and the start of epoch 2.
    epoch1 = stream_indices(10, 3, 1, 10, 10)
    epoch2 = stream_indices(10, 3, 1, 20, 10)
    assert global_batch == epoch1[6:] + epoch2[:4]
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch2


def test_supervised_objective(world, tmp_path):
    output = tmp_path / "supervised"
    assert main(train_args(world, output, "--steps", "2", "--objective", "supervised", "--no-evaluate")) == 0
    assert routers(output).keys() == routers(world["wemoe"]).keys()


def eval_args(model, task, dataset, out_json, *extra):
    return ["eval", "--model", str(model), "--task", f"{task}={dataset}", "--templates", "generic",
            "--output-json", str(out_json), "--quiet", *extra]  # fmt: skip


def test_eval_static_and_wemoe_models(world, tmp_path, capsys):
    out_json = tmp_path / "expert.json"
    clip = ("--clip-model", str(world["clip"]))
    assert main(eval_args(world["expert"], "stripes", world["stripes"], out_json, *clip)) == 0
    printed = capsys.readouterr().out
    assert "| model | stripes | average |" in printed
    payload = json.loads(out_json.read_text())
    assert payload["routing"] is None and 0 <= payload["average"] <= 100
    wemoe_json = tmp_path / "wemoe.json"
    assert main(eval_args(world["wemoe"], "stripes", world["stripes"], wemoe_json, "--routing", "batch")) == 0
    assert json.loads(wemoe_json.read_text())["routing"] == "batch"


def test_eval_matches_a_direct_computation(world, tmp_path):
    """Accuracy from the CLI equals argmax of the zero-shot logits computed by hand."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

    from hf_wemoe.zeroshot.data import ImageClassificationDataset, load_task_dataset
    from hf_wemoe.zeroshot.heads import build_zeroshot_head
    from hf_wemoe.zeroshot.templates import get_templates

    out_json = tmp_path / "direct.json"
    clip_flag = ("--clip-model", str(world["clip"]))
    assert main(eval_args(world["expert"], "blocks", world["blocks"], out_json, *clip_flag)) == 0
    clip = CLIPModel.from_pretrained(world["clip"])
    head = build_zeroshot_head(
        clip,
        AutoTokenizer.from_pretrained(world["clip"]),
        ["red", "green", "blue", "white"],
        get_templates("generic"),
    )
    expert = CLIPVisionModel.from_pretrained(world["expert"])
    data = ImageClassificationDataset(
        load_task_dataset(str(world["blocks"])), AutoImageProcessor.from_pretrained(world["clip"])
    )
    correct = 0
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            embeds = clip.visual_projection(expert(item["pixel_values"][None]).pooler_output)
            correct += int(head(embeds).argmax(-1).item() == item["labels"].item())
    assert json.loads(out_json.read_text())["accuracy"]["blocks"] == pytest.approx(100 * correct / len(data))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda w, a: a.__delitem__(slice(a.index("--templates"), a.index("--templates") + 2)),
            "no built-in prompt templates for task 'blocks'",
        ),
        (lambda w, a: a.__setitem__(a.index("--model") + 1, str(w["expert"])), "no routers to adapt"),
        (lambda w, a: a.extend(["--image-column", "nope"]), "nope"),
        (
            lambda w, a: a.extend(["--classnames", str(w["classnames3"])]),
            "3 class names for a dataset with 4",
        ),
        (lambda w, a: a.extend(["--lr", "1e30"]), "loss became"),
    ],
    ids=["no-templates", "static-model", "no-image-column", "class-count", "nan-loss"],
)
def test_bad_input_is_one_line_and_leaves_no_output(world, tmp_path, capsys, change, message):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    world = {**world, "classnames3": tmp_path / "three.txt"}
    output = tmp_path / "out"
    args = train_args(world, output, "--steps", "3", "--clip-model", str(world["clip"]))
    change(world, args)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
