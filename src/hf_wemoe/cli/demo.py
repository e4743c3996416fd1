"""``hf-wemoe demo``: the whole method, end to end, offline, on the built-in toy zoo."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.cli.options import add_options, resolve_options
from hf_wemoe.cli.toy_zoo import Preset

DEFAULT_STEPS = 200
# The paper's ViT-B/32 run used 1e-4 for 1000 steps (and reports that 1e-3 also works); the demo takes
# 1e-3 to converge within its 200 steps.
DEFAULT_LR = 1e-3
# The unlabelled objectives of hf_wemoe.adaptation (listed here so that `hf-wemoe demo --help` does not load torch).
Objective = Literal["entropy", "infomax"]
# Chosen from measurements on both toy-zoo presets (README, "Router adaptation that holds up").
DEFAULT_OBJECTIVE = "infomax"
DEFAULT_ROUTING_LOSS = 3.0
# Rank of the demo's low-rank WEMoE row, chosen from the rank sweep on the toy zoo (README, "Compact experts").
DEFAULT_RANK = 16

DESCRIPTION = """\
Build (or reuse) the offline toy zoo, a tiny CLIP and one fine-tuned expert per toy task; merge the experts with
every method (average, task arithmetic, TIES, WEMoE, E-WEMoE); set the WEMoE and E-WEMoE routers three ways on
the unlabelled test images: the papers' entropy minimisation, the training-free calibration (no gradient step),
and the calibration followed by --objective (the package's default adaptation; this one is also evaluated on a
mixed-task stream, per-sample and batch routing); merge WEMoE once more with low-rank task vectors (--rank) and
set its routers the package's way; evaluate everything together with the pretrained model, the individual experts
and every MoE method's own oracle-routing bound (the merge collapsed to each task's own stored expert task
vectors); print one table with the CPU time of every adaptation.
"""

EXAMPLES = """\
examples:
  hf-wemoe demo                                   # the full preset; builds the toy zoo on first use
  hf-wemoe demo --preset plain                     # the world where entropy minimisation collapses
  hf-wemoe demo --preset small --steps 50 --output demo-results
"""


class DemoOptions(BaseModel):
    """`hf-wemoe demo` options."""

    model_config = ConfigDict(extra="forbid")

    output: Path | None = Field(
        None, description="write results.md and results.json here", json_schema_extra={"metavar": "DIR"}
    )
    preset: Preset = Field("full", description="toy zoo size")
    seed: int = Field(0, description="toy zoo seed")
    zoo: Path | None = Field(
        None,
        description="toy zoo folder",
        json_schema_extra={"metavar": "DIR", "default_text": "the user cache, built when missing"},
    )
    steps: int = Field(DEFAULT_STEPS, ge=1, description="router adaptation steps")
    lr: float = Field(DEFAULT_LR, gt=0, description="router learning rate")
    batch_size_per_task: int = Field(16, ge=1, description="images per task and step")
    objective: Objective = Field(
        DEFAULT_OBJECTIVE, description="objective of the package's adaptation (after the calibration)"
    )
    routing_loss: float = Field(
        DEFAULT_ROUTING_LOSS, ge=0, description="weight of the task-origin routing term of that adaptation",
        json_schema_extra={"metavar": "W"},
    )
    calibration_images: int = Field(64, ge=1, le=64, description="unlabelled images per task for the calibration")
    rank: int = Field(
        DEFAULT_RANK,
        ge=0,
        description="rank of the low-rank WEMoE row (each expert's task vectors truncated to their best rank-R "
        "factors, `hf-wemoe merge --rank`); 0 leaves the row out",
        json_schema_extra={"metavar": "R"},
    )
    max_test_images: int | None = Field(
        None,
        ge=1,
        description="use at most this many test images per task",
        json_schema_extra={"default_text": "all"},
    )
    workdir: Path | None = Field(
        None,
        description="folder for the merged models",
        json_schema_extra={"metavar": "DIR", "default_text": "a temporary folder"},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, [DemoOptions])


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: these load torch, which `hf-wemoe demo --help` does not need.
    from hf_wemoe.adaptation import TrainOptions
    from hf_wemoe.toy.build import get_toy_zoo
    from hf_wemoe.workflows.experiment import (
        DEFAULT_METHODS,
        Adaptation,
        ExperimentOptions,
        MergeSpec,
        results_markdown,
        run_experiment,
        save_results,
    )
    from hf_wemoe.workflows.suites import toy_suite

    (options,) = resolve_options(args, DemoOptions)
    progress = False if args.quiet else None
    start = time.perf_counter()
    print(f"toy zoo ({options.preset} preset, seed {options.seed}): building or reusing ...", flush=True)
    zoo = get_toy_zoo(options.preset, seed=options.seed, output_dir=options.zoo, progress=progress)
    print(f"toy zoo at {zoo.root}: {len(zoo.tasks)} tasks ({', '.join(zoo.tasks)})", flush=True)
    suite = toy_suite(zoo, max_test_images=options.max_test_images)
    common = {
        "steps": options.steps,
        "lr": options.lr,
        "batch_size_per_task": options.batch_size_per_task,
        "seed": options.seed,
    }
    paper = TrainOptions(**common, objective="entropy", routing_loss=0.0)  # the papers' objective
    ours = TrainOptions(**common, objective=options.objective, routing_loss=options.routing_loss)
    images = options.calibration_images
    package = Adaptation(train=ours, calibrate=True, calibration_images=images, mixed_stream=True)
    methods: list = list(DEFAULT_METHODS)  # the oracle bounds are a flag among them: every MoE merge gets one
    if options.rank:
        # Beyond the papers: only the package's adaptation (the references above show the others).
        package_only = Adaptation(train=ours, calibrate=True, calibration_images=images)
        label = f"wemoe (rank {options.rank})"
        methods.append(MergeSpec("wemoe", {"rank": options.rank}, label, adaptations=[package_only]))
    experiment = ExperimentOptions(
        methods=methods,
        train=paper,
        adaptations=[
            Adaptation(train=paper),
            Adaptation(calibrate=True, calibration_images=images),
            package,
        ],
        progress=progress,
    )
    with tempfile.TemporaryDirectory(prefix="hf-wemoe-demo-") as scratch:
        rows = run_experiment(suite, options.workdir or scratch, experiment)
    table = results_markdown(rows, suite.task_names)
    print()
    print(table)
    note = (
        f"hf-wemoe demo: toy zoo preset {zoo.preset}, seed {zoo.seed}; router adaptation {options.steps} steps, "
        f"lr {options.lr}, {options.batch_size_per_task} images per task and step; calibration from {images} "
        "unlabelled images per task; accuracy in percent on the test splits (`!`: a task the adaptation "
        "monitor saw collapse); adaptation time is CPU time."
    )
    if options.output is not None:
        save_results(rows, suite.task_names, options.output, preamble=note)
        print(f"\nresults written to {options.output}/results.md and results.json")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0
