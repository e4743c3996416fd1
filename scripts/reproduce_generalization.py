#!/usr/bin/env python
"""Generalization to unseen tasks (the papers' protocol): merge and adapt on the seen tasks only, evaluate all of
them; on the Hub's eight tasks (TA8) or offline on the toy zoo.

The unseen tasks have no expert in any merge and no images in the adaptation; they are evaluated with each merged
model and their own zero-shot heads. Rows: the pretrained model, the individual experts (seen tasks only), simple
averaging, task arithmetic, TIES, WEMoE and E-WEMoE after the adaptation (the papers' entropy minimisation unless
--objective/--routing-loss/--calibrate say otherwise; the `adaptation` column names what ran), each with its seen
and unseen averages; the summary puts them next to the reported numbers.

Splits (--split): the papers' 1 holds out mnist and eurosat, 2 holds out resisc45 and svhn; on the toy zoo, 1
holds out digits and scenes (the toy analogues of MNIST and EuroSAT), 2 arrows and textures. --unseen names any
other tasks to hold out.

  python scripts/reproduce_generalization.py --toy full --output generalization-toy   # offline; ~4 min, 2 cores
  python scripts/reproduce_generalization.py --model base-patch32 --split 1            # the Hub; a GPU

Needs, with --model: the Hub (the base and the seen tasks' experts: about 2.3 GB for base-patch32 or base-patch16,
8 GB for large-patch14; the 8 test splits, about 10 GB) and a GPU. The run adapts two merges on the six seen tasks
and evaluates every model on all eight test splits. The papers ran this protocol with lr 2e-3 (the default here).
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
    datasets_note,
    experiment_options,
    finish,
    is_toy,
    load_zoo,
    make_parser,
    names,
    run_main,
)

__doc__ = f"{__doc__.rstrip()}\n\n{GPU_TIME}"

HUB_LR = 2e-3  # the original code's learning rate for the generalization runs
METHODS = ("pretrained", "individual", "average", "task-arithmetic", "ties", "wemoe", "e-wemoe")
# Reported (%, ViT-B/32, Hugging Face checkpoints): seen and unseen averages, and the unseen tasks. WEMoE's split-1
# numbers were measured with batch-averaged routing (this script routes per sample); E-WEMoE's with per-sample
# routing. The ICML paper's own WEMoE row (OpenCLIP checkpoints) is 86.5 seen, 71.1 unseen (mnist 86.3, eurosat 55.9).
REPORTED = {
    "1": {
        "wemoe": {"seen": 86.6, "unseen": 61.1, "mnist": 78.3, "eurosat": 44.0},
        "e-wemoe": {"seen": 86.1, "unseen": 61.8, "mnist": 73.8, "eurosat": 49.7},
        "task-arithmetic": {"seen": 69.9, "unseen": 59.1},
        "ties": {"seen": 68.9, "unseen": 60.2},
    },
    "2": {"wemoe": {"seen": 87.4, "unseen": 49.3, "resisc45": 47.3, "svhn": 51.3}},
}


def parse_args(argv: list[str] | None):
    parser = make_parser(__file__, __doc__)
    add_world_arguments(parser)
    parser.add_argument(
        "--split", choices=("1", "2"), default="1", help="the papers' split (or the toy zoo's) (default: 1)"
    )
    parser.add_argument(
        "--unseen", type=names, default=None, metavar="T,T,...", help="hold out these tasks instead of --split's"
    )
    parser.add_argument(
        "--tasks", type=names, default=None, metavar="T,T,...", help="a subset of the tasks (default: all)"
    )
    add_adaptation_arguments(parser, hub_lr=HUB_LR)
    add_run_arguments(parser, "generalization")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hf_wemoe.errors import WEMoEError
    from hf_wemoe.workflows.experiment import run_experiment
    from hf_wemoe.workflows.protocols import generalization_table
    from hf_wemoe.workflows.suites import (
        GENERALIZATION_SPLITS,
        TA8_DATASETS,
        TOY_GENERALIZATION_SPLITS,
        ta8_suite,
        toy_suite,
        with_unseen,
    )

    started = time.perf_counter()
    args = parse_args(argv)
    if is_toy(args):
        zoo = load_zoo(args)
        suite, splits = toy_suite(zoo, args.max_test_images, args.tasks), TOY_GENERALIZATION_SPLITS
        world = f"toy zoo preset {zoo.preset} (seed {zoo.seed}) at {zoo.root}"
    else:
        suite, splits = ta8_suite(args.model, args.tasks), GENERALIZATION_SPLITS
        world = suite.name
    if args.unseen is not None:
        unseen = args.unseen
    else:
        unseen = [task for task in splits[args.split] if task in suite.task_names]
        if not unseen:
            raise WEMoEError(
                f"split {args.split}'s unseen tasks {list(splits[args.split])} are not among the chosen tasks "
                f"{suite.task_names}; add one to --tasks or name them with --unseen"
            )
    suite = with_unseen(suite, unseen)
    options = experiment_options(args, METHODS, hub_lr=HUB_LR)
    rows = run_experiment(suite, args.workdir, options)
    # The reported numbers belong to the papers' 8-task ViT-B/32 splits: shown only next to such a run.
    paper_run = (
        not is_toy(args) and args.model == "base-patch32" and args.unseen is None
        and suite.task_names == list(TA8_DATASETS) and args.max_test_images is None
    )  # fmt: skip
    reported = REPORTED.get(args.split, {}) if paper_run else {}
    note = (
        f"Generalization, {world}; seen (merged and adapted on): {', '.join(suite.seen)}; unseen (evaluated only, "
        f"with the merged model and their own zero-shot heads): {', '.join(suite.unseen)}; {adaptation_note(args)}."
    )
    if reported:
        note += (
            " Reported: ViT-B/32, Hugging Face checkpoints; the papers' WEMoE row used batch-averaged routing, "
            "E-WEMoE's per-sample routing; per task: "
            + "; ".join(
                f"{method} " + ", ".join(f"{k} {v}" for k, v in values.items() if k not in ("seen", "unseen"))
                for method, values in reported.items()
                if len(values) > 2
            )
            + "."
        )
    note += f"\n\n{datasets_note(suite)}"
    finish(rows, suite.task_names, args.output, note, generalization_table(rows, suite.unseen, reported), started)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
