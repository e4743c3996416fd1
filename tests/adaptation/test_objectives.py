"""Adaptation objectives, the collapse monitor and best-state keeping, on the tiny adaptation world."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from adaptation_fixtures import make_adaptation_world, make_task_dataset
from hf_wemoe.adaptation import (
    AdaptationMonitor,
    TrainOptions,
    adapt_routers,
    entropy_loss,
    infomax_loss,
    marginal_entropy,
    objective_label,
    routing_target_loss,
)
from hf_wemoe.cli.main import main
from hf_wemoe.errors import WEMoEError
from hf_wemoe.models.modeling_wemoe import is_router_parameter
from hf_wemoe.workflows.tasks import load_tasks
from hf_wemoe.workflows.train import TrainConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives-world")
    world = make_adaptation_world(root)
    # A constructed collapse: "blocks" images whose labels are all the first class, for a supervised run that
    # teaches the model to predict that class everywhere.
    import datasets

    one_class = datasets.load_from_disk(str(make_task_dataset(root / "blocks-src", "blocks", 24, seed=0)))
    one_class.map(lambda row: {"label": 0}).save_to_disk(str(root / "blocks-one-class"))
    world["blocks-one-class"] = root / "blocks-one-class"
    return world


def load(world, **tasks):
    config = TrainConfig(
        model=str(world["wemoe"]),
        task=tasks or {"blocks": str(world["blocks"]), "stripes": str(world["stripes"])},
        templates=["generic"],
    )
    return load_tasks(config, require_labels=False)[:2]


def test_losses_measure_what_they_say():
    uniform = torch.zeros(6, 4)
    assert math.isclose(float(entropy_loss(uniform)), math.log(4), rel_tol=1e-6)
    assert math.isclose(float(marginal_entropy(uniform)), math.log(4), rel_tol=1e-6)
    # Confident and all the same class: no entropy, and no marginal entropy either -> infomax does not reward it.
    same = torch.tensor([[20.0, 0, 0, 0]]).repeat(6, 1)
    diverse = torch.eye(4).repeat(2, 1) * 20
    assert float(entropy_loss(same)) < 1e-6 and float(entropy_loss(diverse)) < 1e-6
    assert float(infomax_loss(same)) > float(infomax_loss(diverse)) + 1.0
    routing = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    assert math.isclose(float(routing_target_loss(routing, expert=1)), 2 / 4, rel_tol=1e-6)
    # More than its share on the own expert costs nothing (a pruned task vector may need it); others always cost.
    assert float(routing_target_loss([torch.tensor([[0.0, 2.5]])], expert=1)) == 0.0
    assert math.isclose(float(routing_target_loss([torch.tensor([[-0.5, 1.5]])], expert=1)), 0.25, rel_tol=1e-6)
    assert objective_label(TrainOptions(objective="infomax", routing_loss=1.0, keep_best=True)) == (
        "infomax + routing 1 (best kept)"
    )
    assert objective_label(TrainOptions()) == "infomax + routing auto"
    assert objective_label(TrainOptions(objective="entropy", routing_loss=0)) == "entropy"


@pytest.mark.parametrize(
    "options",
    [
        {"objective": "entropy", "routing_loss": 0.0},
        {"objective": "infomax", "routing_loss": 0.0},
        {"objective": "entropy", "routing_loss": 1.0},
        {"objective": "infomax", "routing_loss": 0.5},
        {"objective": "supervised", "routing_loss": 1.0},
    ],
    ids=lambda o: objective_label(TrainOptions(**o)),
)
def test_every_objective_changes_only_routers(world, options):
    classifier, tasks = load(world)
    before = {k: v.clone() for k, v in classifier.vision_model.state_dict().items()}
    adapt_routers(classifier, tasks, TrainOptions(steps=2, lr=0.05, batch_size_per_task=4, **options), progress=False)
    after = classifier.vision_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Gradients reached every router parameter (all changed), and nothing else can take one.
    assert changed == {k for k in before if is_router_parameter(k)}
    assert all(p.requires_grad == is_router_parameter(n) for n, p in classifier.named_parameters())


def test_routing_loss_needs_tasks_named_like_experts(world):
    classifier, tasks = load(world, squares=str(world["blocks"]))
    with pytest.raises(WEMoEError, match="task\\(s\\) \\['squares'\\] name no expert"):
        adapt_routers(classifier, tasks, TrainOptions(steps=1, routing_loss=1.0), progress=False)
    # Left unset, the term is simply off for tasks that name no expert.
    result = adapt_routers(classifier, tasks, TrainOptions(steps=1, monitor_every=0), progress=False)
    assert result["objective"] == "infomax"


def test_routing_loss_routes_each_task_to_its_expert(world):
    classifier, tasks = load(world)
    options = TrainOptions(steps=30, lr=0.05, batch_size_per_task=8, routing_loss=3.0, monitor_every=10)
    result = adapt_routers(classifier, tasks, options, progress=False)
    experts = list(classifier.vision_model.config.expert_names)
    first, last = result["monitor"]["trajectory"][0], result["monitor"]["trajectory"][-1]
    for task in ("blocks", "stripes"):
        own = experts.index(task)
        start, end = first["tasks"][task]["routing"], last["tasks"][task]["routing"]
        assert end[own] > start[own] + 0.2
        assert end[own] - end[1 - own] > start[own] - start[1 - own] + 0.3


def test_collapse_detector_fires_on_a_collapsing_run(world, caplog):
    classifier, tasks = load(world, blocks=str(world["blocks-one-class"]), stripes=str(world["stripes"]))
    options = TrainOptions(
        steps=12, lr=0.1, batch_size_per_task=8, objective="supervised", routing_loss=0.0, monitor_every=3,
        keep_best=True,
    )
    with caplog.at_level(logging.WARNING, logger="hf_wemoe.adaptation"):
        result = adapt_routers(classifier, tasks, options, progress=False)
    monitor = result["monitor"]
    assert "blocks" in monitor["collapsed"]
    trajectory = monitor["trajectory"]
    assert trajectory[-1]["tasks"]["blocks"]["classes"] < 0.5 * trajectory[0]["tasks"]["blocks"]["classes"]
    warnings = [r.getMessage() for r in caplog.records if "collapsing" in r.getMessage()]
    assert any("task 'blocks' is collapsing" in w and "--keep-best" in w for w in warnings)
    assert len([w for w in warnings if "'blocks'" in w]) == 1  # once per task, not at every probe
    # The best state by the unlabelled criterion is not the collapsed end, and it is what the model holds.
    assert result["kept_step"] == monitor["best_step"] != options.steps


def test_collapse_detector_stays_quiet_on_a_healthy_run(world, caplog):
    classifier, tasks = load(world)
    options = TrainOptions(
        steps=12, lr=0.01, batch_size_per_task=8, objective="infomax", routing_loss=0.0, monitor_every=3
    )
    with caplog.at_level(logging.WARNING, logger="hf_wemoe.adaptation"):
        result = adapt_routers(classifier, tasks, options, progress=False)
    assert result["monitor"]["collapsed"] == {}
    assert not [r for r in caplog.records if "collapsing" in r.getMessage()]
    assert [r["step"] for r in result["monitor"]["trajectory"]] == [0, 3, 6, 9, 12]


def test_monitor_probe_is_fixed_and_deterministic(world):
    classifier, tasks = load(world)
    options = TrainOptions(monitor_images=5, seed=3)
    one, two = AdaptationMonitor(classifier, tasks, options), AdaptationMonitor(classifier, tasks, options)
    assert one.indices == two.indices and all(len(v) == 5 for v in one.indices.values())
    assert one.measure(0) == two.measure(0)
    assert AdaptationMonitor(classifier, tasks, TrainOptions(monitor_images=5, seed=4)).indices != one.indices


def test_resume_is_exact_with_the_new_objectives(world, tmp_path):
    common = [
        "train", "--model", str(world["wemoe"]), "--task", f"blocks={world['blocks']}",
        "--task", f"stripes={world['stripes']}", "--templates", "generic", "--batch-size-per-task", "4",
        "--lr", "0.05", "--quiet", "--objective", "infomax", "--routing-loss", "0.5", "--keep-best",
        "--monitor-every", "2", "--monitor-images", "8",
    ]  # fmt: skip
    assert main([*common, "--steps", "6", "--output", str(tmp_path / "full")]) == 0
    checkpoints = tmp_path / "ckpt"
    partial = [*common, "--steps", "3", "--save-every", "3", "--no-evaluate", "--checkpoint-dir", str(checkpoints)]
    assert main([*partial, "--output", str(tmp_path / "partial")]) == 0
    resume = ["--steps", "6", "--resume-from", str(checkpoints / "step-3"), "--output", str(tmp_path / "resumed")]
    assert main([*common, *resume]) == 0
    full, resumed = (load_file(tmp_path / n / "model.safetensors") for n in ("full", "resumed"))
    assert all(torch.equal(full[k], resumed[k]) for k in full if is_router_parameter(k))
    results = [json.loads((tmp_path / n / "eval_results.json").read_text()) for n in ("full", "resumed")]
    assert results[0]["adaptation"] == results[1]["adaptation"]
    assert [r["step"] for r in results[0]["adaptation"]["monitor"]["trajectory"]] == [0, 2, 4, 6]
    assert results[0]["adaptation"]["objective"] == "infomax + routing 0.5 (best kept)"


def test_train_reports_the_monitor(world, tmp_path, capsys):
    output = tmp_path / "adapted"
    args = ["train", "--model", str(world["wemoe"]), "--task", f"blocks={world['blocks']}", "--task",
            f"stripes={world['stripes']}", "--templates", "generic", "--batch-size-per-task", "4", "--steps", "4",
            "--monitor-every", "2", "--quiet", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    # The defaults: infomax, and the routing term on because both tasks are named like experts.
    assert "with infomax + routing 3 (" in capsys.readouterr().out
    results = json.loads((output / "eval_results.json").read_text())
    trajectory = results["adaptation"]["monitor"]["trajectory"]
    assert [r["step"] for r in trajectory] == [0, 2, 4]
    assert set(trajectory[0]["tasks"]["blocks"]) == {"classes", "entropy", "information", "routing"}
    assert len(trajectory[0]["tasks"]["blocks"]["routing"]) == 2
    # The routing plot gains the trajectory panels: a taller figure than the heatmaps alone.
    from PIL import Image

    assert Image.open(output / "routing.png").size[1] > 500


def test_train_can_start_from_the_calibration(world, tmp_path):
    output = tmp_path / "calibrated-then-adapted"
    args = ["train", "--model", str(world["wemoe"]), "--task", f"blocks={world['blocks']}", "--task",
            f"stripes={world['stripes']}", "--templates", "generic", "--batch-size-per-task", "4", "--steps", "2",
            "--calibrate", "--calibration-images", "8", "--lr", "1e-4", "--quiet", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    provenance = json.loads((output / "config.json").read_text())["provenance"]
    assert provenance["calibration"]["images_per_task"] == 8 and provenance["adaptation"]["steps"] == 2
    card = (output / "README.md").read_text()
    assert "### Router calibration" in card and "from 8 unlabelled images per task" in card
    assert "objective `infomax + routing 3`" in card
    # Two tiny steps barely move the calibrated routers: each task still routes to its own expert.
    trajectory = json.loads((output / "eval_results.json").read_text())["adaptation"]["monitor"]["trajectory"]
    experts = json.loads((output / "config.json").read_text())["expert_names"]
    for task in ("blocks", "stripes"):
        routing = trajectory[0]["tasks"][task]["routing"]
        assert routing[experts.index(task)] > 0.7 > routing[1 - experts.index(task)]


def test_trackers_receive_the_loss_and_the_monitor(world):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logs: list[tuple[int | None, dict]] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

    recorder = Recorder()
    classifier, tasks = load(world)
    options = TrainOptions(steps=4, batch_size_per_task=4, monitor_every=2, log_every=2)
    adapt_routers(classifier, tasks, options, report_to=[recorder], progress=False)
    probes = {step: values for step, values in recorder.logs if "monitor/score" in values}
    assert sorted(probes) == [0, 2, 4]
    assert {"monitor/blocks/classes", "monitor/stripes/information", "monitor/blocks/routing/stripes"} <= set(
        probes[2]
    )
    assert [step for step, values in recorder.logs if "loss" in values] == [2, 4]
