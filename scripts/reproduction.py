"""What the `reproduce_*.py` scripts share: the world they run in (the Hub's checkpoints and datasets, or the
offline toy zoo), the router adaptation (the papers' by default; improvements are options, labelled in every row),
where results go, and errors as one `error:` line with exit code 2.

The experiments themselves are `hf_wemoe.workflows.experiment.run_experiment` and the protocols of
`hf_wemoe.workflows.protocols`: the same code as `hf-wemoe demo`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_wemoe.cli.options import OptionParser
from hf_wemoe.errors import WEMoEError

HUB_MODELS = ("base-patch32", "base-patch16", "large-patch14")
TOY_PRESETS = ("full", "plain", "small")
# The toy zoo's adaptation is the demo's: 200 steps at lr 1e-3 converge at toy size (the papers ran 1000 at 1e-4).
TOY_STEPS, TOY_LR = 200, 1e-3
HUB_STEPS = 1000

# For --help: what the papers' adaptation costs. This project measured it only on a CPU (BENCHMARKS.md: one
# per-sample router step of ViT-B/32 on 128 images, 8 tasks x 16, took 42 s on 2 cores of an idle machine and 78 s
# under load); the papers' reference code took 15-20 min per 1000 ViT-B/32 steps on 2 GPUs (with batch routing). ViT-B/16 has about 4x B/32's tokens and
# ViT-L/14 about 3.5x the parameters on 5x the tokens: the other sizes are scaled by that compute, not measured.
GPU_TIME = """\
GPU time (not measured by this project, which had no GPU: scaled from the papers' reference figure of 15-20 min per
1000 ViT-B/32 steps on 8 tasks, and by compute for the other sizes): per 1000 steps on 8 tasks about 15-20 min
(base-patch32), 1-1.5 h (base-patch16), 4-5 h (large-patch14); a step's time grows with the number of tasks (16
images each). On 2 CPU cores one ViT-B/32 step of 8 x 16 images takes 42-78 s (BENCHMARKS.md; more under load),
1000 steps 12-22 h: use the toy zoo (--toy) there."""
# Minutes per 1000 steps on 8 tasks (the estimate above), per model size.
_MINUTES = {"base-patch32": (15, 20), "base-patch16": (60, 90), "large-patch14": (240, 300)}


def gpu_estimate(adaptations: int, tasks: int) -> str:
    """A sentence for --help: the estimated GPU time of `adaptations` runs of 1000 steps on `tasks` tasks."""
    parts = []
    for model, (low, high) in _MINUTES.items():
        scale = adaptations * tasks / 8
        low_h, high_h = low * scale / 60, high * scale / 60
        span = f"{low * scale:.0f}-{high * scale:.0f} min" if high_h < 1.5 else f"{low_h:.1f}-{high_h:.1f} h"
        parts.append(f"{span} ({model})")
    text = (
        f"This script's default run adapts {adaptations} merges on {tasks} tasks for 1000 steps: about "
        + ", ".join(parts) + " of adaptation, plus the evaluations."
    )
    return textwrap.fill(text, width=115)


def make_parser(script: str, doc: str) -> OptionParser:
    """A parser with the command line's conventions (no abbreviations; a bad flag is one `error:` line, exit 2):
    `doc`'s first paragraph is the description, the rest the epilog."""
    head, _, tail = doc.strip().partition("\n\n")
    return OptionParser(prog=Path(script).name, description=head, epilog=tail)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # what argparse names in "invalid positive integer value: '0'"
positive_float.__name__ = "positive number"


def names(text: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def comma_separated(cast: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    """An argparse type for a comma-separated list of `cast` values; `name` is what argparse calls it in errors
    ("invalid comma-separated list of numbers value: ...")."""

    def parse(text: str) -> list[Any]:
        return [cast(item) for item in names(text)]

    parse.__name__ = name
    return parse


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """What a sweep script adds to the world: `--tasks` (a subset) and `--oracle` (each MoE merge's own bound)."""
    parser.add_argument(
        "--tasks", type=names, default=None, metavar="T,T,...", help="a subset of the tasks (default: all)"
    )
    parser.add_argument(
        "--oracle", action="store_true", help="also evaluate each MoE merge's own oracle-routing bound"
    )


def add_world_arguments(parser: argparse.ArgumentParser, model_help: str = "CLIP size on the Hub") -> None:
    """`--model` (the Hub's checkpoints), or `--toy PRESET` / `--zoo DIR` (offline), and `--max-test-images`."""
    parser.add_argument(
        "--model", choices=HUB_MODELS, default="base-patch32", help=f"{model_help} (default: %(default)s)"
    )
    parser.add_argument(
        "--toy",
        choices=TOY_PRESETS,
        default=None,
        metavar="PRESET",
        help=f"run offline on the toy zoo of this preset ({', '.join(TOY_PRESETS)}; built into the cache on first "
        "use, about 4 minutes) instead of the Hub",
    )
    parser.add_argument("--zoo", type=Path, default=None, metavar="DIR", help="a built toy zoo folder (implies --toy)")
    parser.add_argument(
        "--max-test-images", type=positive_int, default=None, metavar="N", help="at most N test images per task "
        "(default: all)"
    )  # fmt: skip


def add_adaptation_arguments(parser: argparse.ArgumentParser, hub_lr: float = 1e-4) -> None:
    """The router adaptation: the papers' (entropy, no routing term, from the merge as built) by default."""
    parser.add_argument(
        "--steps", type=positive_int, default=None,
        help=f"router adaptation steps (default: {HUB_STEPS} on the Hub, the papers'; {TOY_STEPS} on the toy zoo)",
    )  # fmt: skip
    parser.add_argument(
        "--lr", type=positive_float, default=None,
        help=f"Adam learning rate (default: {hub_lr:g} on the Hub, the papers'; {TOY_LR:g} on the toy zoo)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size-per-task", type=positive_int, default=16, help="images per task and step (default: 16)"
    )
    parser.add_argument(
        "--objective", choices=("entropy", "infomax"), default="entropy",
        help="adaptation objective (default: entropy, the papers'; infomax is the package's)",
    )  # fmt: skip
    parser.add_argument(
        "--routing-loss", type=float, default=0.0, metavar="W",
        help="weight of the task-origin routing term (default: 0, the papers'; the package uses 3)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate", action="store_true",
        help="start from the training-free router calibration (64 images per task) instead of the merge as built",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and router init (default: 0)")


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Evaluation batch, device, the work and output folders, quiet."""
    parser.add_argument("--eval-batch-size", type=positive_int, default=128, help="(default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(f"{name}-work"), help="merged models (default: %(default)s)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(f"{name}-results"), help="results.md/json (default: %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def is_toy(args: argparse.Namespace) -> bool:
    return getattr(args, "toy", None) is not None or getattr(args, "zoo", None) is not None


def load_zoo(args: argparse.Namespace) -> Any:
    """The toy zoo of `--zoo` or `--toy` (built into the cache when missing)."""
    from hf_wemoe.toy import ZooManifest, get_toy_zoo

    if args.zoo is not None:
        return ZooManifest.load(args.zoo)
    return get_toy_zoo(args.toy, progress=False if args.quiet else None)


def experiment_options(args: argparse.Namespace, methods: Sequence[Any], hub_lr: float = 1e-4) -> Any:
    """`ExperimentOptions` of the parsed arguments: one adaptation, the papers' unless the options change it."""
    from hf_wemoe.adaptation import TrainOptions
    from hf_wemoe.workflows.experiment import Adaptation, ExperimentOptions

    toy = is_toy(args)
    args.steps = args.steps or (TOY_STEPS if toy else HUB_STEPS)
    args.lr = args.lr or (TOY_LR if toy else hub_lr)
    train = TrainOptions(
        steps=args.steps,
        lr=args.lr,
        batch_size_per_task=args.batch_size_per_task,
        objective=args.objective,
        routing_loss=args.routing_loss,
        seed=args.seed,
    )
    return ExperimentOptions(
        methods=list(methods),
        train=train,
        adaptations=[Adaptation(train=train, calibrate=args.calibrate)],
        eval_batch_size=args.eval_batch_size,
        device=args.device,
        progress=False if args.quiet else None,
    )


def adaptation_note(args: argparse.Namespace) -> str:
    """One sentence on how the routers were set, for the results' preamble."""
    start = "the training-free calibration" if args.calibrate else "the merge as built"
    routing = f", routing term {args.routing_loss:g}" if args.routing_loss else ""
    return (
        f"adaptation from {start}: {args.objective}{routing}, {args.steps} steps, Adam lr {args.lr:g}, "
        f"{args.batch_size_per_task} images per task and step; routing: per sample"
    )


def datasets_note(suite: Any) -> str:
    """The dataset references a suite evaluated, for the results' preamble."""
    return "datasets: " + ", ".join(f"{task.name}={task.dataset}" for task in suite.tasks)


def finish(
    rows: Sequence[Any], tasks: Sequence[str], output: Path, preamble: str, summary: str, started: float
) -> None:
    """Write results.json/results.md (preamble, the summary table, then every row) and print both tables."""
    from hf_wemoe.workflows.experiment import results_markdown, save_results

    save_results(rows, tasks, output, preamble=f"{preamble}\n\n{summary}")
    print()
    print(results_markdown(rows, tasks))
    print()
    print(summary)
    print(f"\nresults written to {output}/results.md and results.json ({time.perf_counter() - started:.0f} s)")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """`main(argv)`, with bad input (a `WEMoEError`, e.g. from the parser) as one `error:` line and exit code 2."""
    try:
        return main(argv)
    except WEMoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
