"""`hf-wemoe eval --stream mixed`: all tasks as one shuffled stream, each image scored with its own task's head."""

from __future__ import annotations

import json

import pytest

from adaptation_fixtures import make_adaptation_world
from hf_wemoe.cli.main import main
from hf_wemoe.evaluation import evaluate_mixed_stream, evaluate_tasks
from hf_wemoe.workflows.tasks import load_tasks
from hf_wemoe.workflows.train import TrainConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_adaptation_world(tmp_path_factory.mktemp("mixed-stream-world"))


def eval_args(world, output, *extra):
    return ["eval", "--model", str(world["wemoe"]), "--task", f"blocks={world['blocks']}", "--task",
            f"stripes={world['stripes']}", "--templates", "generic", "--quiet", "--output-json", str(output),
            *extra]  # fmt: skip


def test_per_sample_routing_does_not_care_which_images_share_a_batch(world, tmp_path):
    assert main(eval_args(world, tmp_path / "tasks.json", "--eval-batch-size", "7")) == 0
    assert main(eval_args(world, tmp_path / "mixed.json", "--stream", "mixed", "--eval-batch-size", "7")) == 0
    tasks, mixed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tasks", "mixed"))
    assert mixed["stream"] == "mixed, batch 7" and tasks["stream"] == "tasks"
    assert mixed["accuracy"] == tasks["accuracy"] and mixed["num_examples"] == {"blocks": 24, "stripes": 24}


def test_the_stream_mixes_tasks_and_batch_routing_sees_it(world):
    config = TrainConfig(
        model=str(world["wemoe"]), task={"blocks": str(world["blocks"]), "stripes": str(world["stripes"])},
        templates=["generic"],
    )  # fmt: skip
    classifier, tasks, _ = load_tasks(config, require_labels=True)
    seen = []
    original = classifier.embed

    def spy(pixel_values, **kwargs):
        seen.append(len(pixel_values))
        return original(pixel_values, **kwargs)

    classifier.embed = spy
    per_sample = evaluate_mixed_stream(classifier, tasks, batch_size=16, seed=1, progress=False)
    assert seen == [16, 16, 16]  # 48 images of two tasks in three mixed batches
    classifier.vision_model.set_routing("batch")
    batch_routed = evaluate_mixed_stream(classifier, tasks, batch_size=16, seed=1, progress=False)
    one_per_batch = evaluate_mixed_stream(classifier, tasks, batch_size=1, seed=1, progress=False)
    # Batch routing of one image is per-sample routing; over a mixed batch it is an average of both tasks'.
    assert one_per_batch.accuracy == per_sample.accuracy
    assert batch_routed.num_examples == per_sample.num_examples == {"blocks": 24, "stripes": 24}
    classifier.vision_model.set_routing("sample")
    assert evaluate_tasks(classifier, tasks, 16, progress=False).accuracy == per_sample.accuracy
