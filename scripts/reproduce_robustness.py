#!/usr/bin/env python
"""Robustness to corrupted test data (the papers' protocol): four tasks, the routers adapted and every model
evaluated on one test split at a time, clean or corrupted; on the Hub or offline on the toy zoo.

For each test condition (--corruptions: `clean` and the seven corruptions, named like the Hub datasets' splits:
motion_blur, impulse_noise, gaussian_noise, pixelate, spatter, contrast, jpeg_compression) it merges the four
experts with task arithmetic, WEMoE and E-WEMoE (--methods), adapts the MoE routers on that condition's unlabelled
test images (the papers' entropy minimisation unless --objective/--routing-loss/--calibrate say otherwise; the
`adaptation` column names what ran) and evaluates on the same images. The summary gives each method's average
per condition next to the reported one, with the condition's lowest task, and names any task the adaptation
monitor saw collapse (`!`): entropy minimisation can collapse a task under heavy noise (the papers report EuroSAT
near 10%); the full table below it has every task.

Tasks: on the Hub stanford-cars, eurosat, resisc45, gtsrb (`tanganke/<dataset>#<corruption>`); on the toy zoo
digits, shapes, arrows, textures (the four whose experts matter most), their test splits corrupted by
`hf_wemoe.toy.corruptions` at --severity (default 3 of 5), built beside the zoo on first use.

  python scripts/reproduce_robustness.py --toy full --output robustness-toy    # offline; ~9 min on 2 CPU cores
  python scripts/reproduce_robustness.py --model base-patch32                   # the Hub; a GPU
  python scripts/reproduce_robustness.py --model base-patch32 --corruptions clean,impulse_noise

Needs, with --model: the Hub (the base and 4 experts: about 1.8 GB for base-patch32 or base-patch16, 6 GB for
large-patch14; each task's clean and corrupted test splits) and a GPU. The run adapts two merges on four tasks per
condition (16 adaptations for all eight) and evaluates three models per condition. The Hub's pixelate splits are
suspiciously small files: check them before trusting that column.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared module, reproduction.py

from reproduction import (  # noqa: E402
    GPU_TIME,
    adaptation_note,
    add_adaptation_arguments,
    add_run_arguments,
    add_world_arguments,
    experiment_options,
    finish,
    is_toy,
    load_zoo,
    make_parser,
    names,
    positive_int,
    run_main,
)

__doc__ = f"{__doc__.rstrip()}\n\n{GPU_TIME}"

METHODS = ("task-arithmetic", "wemoe", "e-wemoe")
# Reported average accuracy (%, ViT-B/32, Hugging Face checkpoints, four tasks) per test condition.
REPORTED = {
    "wemoe": {"clean": 92.4, "motion_blur": 85.5, "impulse_noise": 67.0, "gaussian_noise": 66.8, "pixelate": 28.0,
              "spatter": 68.1, "contrast": 75.9, "jpeg_compression": 82.0},
    "e-wemoe": {"motion_blur": 86.4, "impulse_noise": 67.2, "gaussian_noise": 67.8, "pixelate": 31.2,
                "spatter": 70.6, "contrast": 84.8, "jpeg_compression": 87.8},
}  # fmt: skip


def parse_args(argv: list[str] | None):
    from hf_wemoe.workflows.suites import ROBUSTNESS_CONDITIONS

    parser = make_parser(__file__, __doc__)
    add_world_arguments(parser)
    parser.add_argument(
        "--corruptions", type=names, default=list(ROBUSTNESS_CONDITIONS), metavar="C,C,...",
        help="test conditions, in order (default: all: clean and the seven corruptions)",
    )  # fmt: skip
    parser.add_argument(
        "--tasks", type=names, default=None, metavar="T,T,...",
        help="a subset of the tasks (default: the four of the protocol; on the toy zoo any of its tasks)",
    )  # fmt: skip
    parser.add_argument(
        "--methods", type=names, default=list(METHODS), metavar="M,M,...",
        help=f"merge methods, plus `pretrained`/`individual`/`oracle` rows (default: {','.join(METHODS)})",
    )  # fmt: skip
    parser.add_argument(
        "--severity", type=positive_int, default=None, help="toy zoo only: corruption severity 1..5 (default: 3)"
    )
    add_adaptation_arguments(parser)
    add_run_arguments(parser, "robustness")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hf_wemoe.errors import WEMoEError
    from hf_wemoe.toy.corruptions import DEFAULT_SEVERITY
    from hf_wemoe.workflows.protocols import robustness_table, run_robustness
    from hf_wemoe.workflows.suites import (
        ROBUSTNESS_TASKS,
        TOY_ROBUSTNESS_TASKS,
        check_condition,
        robustness_suite,
        toy_robustness_suite,
    )

    started = time.perf_counter()
    args = parse_args(argv)
    for condition in args.corruptions:
        check_condition(condition)  # before anything is downloaded or built
    if args.severity is not None and not is_toy(args):
        raise WEMoEError("--severity sets the toy zoo's corruptions; the Hub's splits come as they are (use --toy)")
    severity = args.severity or DEFAULT_SEVERITY
    progress = False if args.quiet else None
    if is_toy(args):
        zoo = load_zoo(args)
        tasks = args.tasks or list(TOY_ROBUSTNESS_TASKS)

        def suite_for(condition: str):
            return toy_robustness_suite(zoo, condition, tasks, args.max_test_images, severity, progress)

        world = f"toy zoo preset {zoo.preset} (seed {zoo.seed}) at {zoo.root}, corruption severity {severity}"
    else:
        tasks = args.tasks or list(ROBUSTNESS_TASKS)

        def suite_for(condition: str):
            return robustness_suite(args.model, condition, tasks)

        world = f"clip-vit-{args.model}"
    used = {}

    def recorded(condition: str):
        used[condition] = suite = suite_for(condition)
        return suite

    recorded(args.corruptions[0])  # bad tasks or a missing zoo are reported before the first merge
    options = experiment_options(args, args.methods)
    options.merge_specs()  # an unknown method, too
    rows = run_robustness(recorded, args.corruptions, args.workdir, options)
    # The reported numbers are four-task ViT-B/32 averages: shown only next to such a run.
    paper_run = (
        not is_toy(args) and args.model == "base-patch32" and sorted(tasks) == sorted(ROBUSTNESS_TASKS)
        and args.max_test_images is None
    )  # fmt: skip
    task_names = used[args.corruptions[0]].task_names
    note = (
        f"Robustness, {world}; tasks: {', '.join(task_names)}; routers adapted and models evaluated on each test "
        f"split in turn; {adaptation_note(args)}. Summary cells: average over the tasks (the lowest task; "
        "`collapsed: T!` when the adaptation monitor saw task T collapse).\n\ndatasets per test split: "
        + "; ".join(
            f"{condition}: " + ", ".join(task.dataset for task in suite.tasks) for condition, suite in used.items()
        )
    )
    summary = robustness_table(rows, args.corruptions, REPORTED if paper_run else {})
    finish(rows, task_names, args.output, note, summary, started)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
