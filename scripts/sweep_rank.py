#!/usr/bin/env python
"""Low-rank WEMoE's accuracy against the rank of its task vectors (`hf-wemoe merge --rank R`, beyond the papers):
offline on the toy zoo, or on the Hub's eight tasks (TA8).

For every rank it merges WEMoE with each expert's MLP task vectors truncated to their best rank-R factors, sets
the routers with the package's adaptation (the training-free calibration, then infomax with the routing term 3,
per-sample routing: the `adaptation` column names it; --objective/--routing-loss/--no-calibrate change it) and
evaluates every task. Task arithmetic, dense WEMoE and E-WEMoE-90%, adapted the same way, are the references. The
summary shows per rank the average accuracy and its gap to dense WEMoE, the stored parameters against one
backbone (the pretrained vision tower), the saved size, and the forward time of the adapted model against the
static task-arithmetic merge (medians of round-robin forwards at the evaluation batch, in the same process; at toy
size per-operation overhead dominates it, see BENCHMARKS.md for ViT-B/32 shapes).

  python scripts/sweep_rank.py --toy full --output rank-toy            # offline; ~8 min on 2 CPU cores
  python scripts/sweep_rank.py --model base-patch32 --ranks 8,16,32     # the Hub; a GPU

Needs, with --model: the Hub (the base and 8 experts: about 3 GB for base-patch32 or base-patch16, 11 GB for
large-patch14; the 8 test splits, about 10 GB) and a GPU. The run adapts 2 + (number of ranks) merges.
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
    add_sweep_arguments,
    add_world_arguments,
    comma_separated,
    datasets_note,
    experiment_options,
    finish,
    gpu_estimate,
    is_toy,
    load_zoo,
    make_parser,
    run_main,
)

__doc__ = f"{__doc__.rstrip()}\n\n{GPU_TIME}\n{gpu_estimate(7, 8)}"

# The package's adaptation (the demo's default), not the papers': this sweep measures a feature beyond them.
PACKAGE_ADAPTATION = {"calibrate": True, "objective": "infomax", "routing_loss": 3.0}


integers = comma_separated(int, "comma-separated list of integers")


def parse_args(argv: list[str] | None):
    from hf_wemoe.workflows.protocols import RANK_POINTS

    parser = make_parser(__file__, __doc__)
    add_world_arguments(parser)
    parser.add_argument(
        "--ranks", type=integers, default=list(RANK_POINTS), metavar="R,R,...",
        help=f"ranks of the task vectors (default: {','.join(str(r) for r in RANK_POINTS)})",
    )  # fmt: skip
    add_sweep_arguments(parser)
    add_adaptation_arguments(parser)
    parser.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false",
        help="adapt from the merge as built instead of the training-free calibration",
    )  # fmt: skip
    parser.set_defaults(**PACKAGE_ADAPTATION)
    add_run_arguments(parser, "rank")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hf_wemoe.io.weights import count_parameters
    from hf_wemoe.workflows.experiment import merge_folder
    from hf_wemoe.workflows.protocols import check_ranks, forward_time_ratios, rank_table, run_rank_sweep
    from hf_wemoe.workflows.suites import ta8_suite, toy_suite

    started = time.perf_counter()
    args = parse_args(argv)
    ranks = check_ranks(args.ranks)
    if is_toy(args):
        zoo = load_zoo(args)
        suite = toy_suite(zoo, args.max_test_images, args.tasks)
        world = f"toy zoo preset {zoo.preset} (seed {zoo.seed}) at {zoo.root}"
    else:
        suite = ta8_suite(args.model, args.tasks)
        world = suite.name
    options = experiment_options(args, [])
    rows = run_rank_sweep(suite, args.workdir, ranks, options, oracle=args.oracle)

    # The static merge has exactly the backbone's parameters (one CLIP vision tower).
    backbone = count_parameters(merge_folder(args.workdir, "task-arithmetic"))["total"]
    moe = [row.method for row in rows if row.stream == "per task" and row.routing is not None]
    folders = {"task-arithmetic": merge_folder(args.workdir, "task-arithmetic")}
    folders.update({name: merge_folder(args.workdir, name, adaptation=0) for name in dict.fromkeys(moe)})
    print("timing the forward of every adapted model against task arithmetic ...", file=sys.stderr)
    ratios = forward_time_ratios(folders, "task-arithmetic", batch=args.eval_batch_size)
    note = (
        f"Low-rank WEMoE rank sweep, {world}; tasks: {', '.join(suite.task_names)}; {adaptation_note(args)}. "
        "Parameters: every stored value of the merged vision tower (routers included); backbone: one CLIP vision "
        f"tower ({backbone:,} parameters). Forward time: the adapted model against the task-arithmetic merge, batch "
        f"{args.eval_batch_size}, this process.\n\n{datasets_note(suite)}"
    )
    finish(rows, suite.task_names, args.output, note, rank_table(rows, ranks, backbone, ratios), started)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, None))
