"""``hf-wemoe train``: adapt the routers of a WEMoE model on unlabelled task data."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_options, resolve_options
from hf_wemoe.zeroshot.data import DATASET_REF_HELP
from hf_wemoe.zeroshot.templates import TEMPLATES_HELP

_EXAMPLES = """\
examples:
  hf-wemoe train --model wemoe-vit-b32 --task sun397=tanganke/sun397 --task svhn=ufldl-stanford/svhn:cropped_digits \\
      --output wemoe-vit-b32-tta
  accelerate launch -m hf_wemoe train --config train.yaml          # several processes / GPUs
  torchrun --nproc_per_node 2 -m hf_wemoe train --config train.yaml
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from hf_wemoe.workflows.train_eval import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="adapt the routers of a WEMoE model (test-time adaptation by entropy minimisation)",
        description=(
            "Train only the routers of a WEMoE model: every step takes one batch from every task and minimises the "
            "entropy of the zero-shot predictions (or the cross-entropy with --objective supervised). Writes the "
            "adapted model, eval_results.json and routing.png to --output.\n\n"
            + DATASET_REF_HELP
            + "\n\n"
            + TEMPLATES_HELP
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_options(
        parser,
        TrainConfig,
        first=["model", "task", "output"],
        metavars={"task": "NAME=DATASET", "model": "REF", "report_to": "TRACKER", "push_to_hub": "ORG/NAME"},
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from hf_wemoe.evaluation import markdown_table
    from hf_wemoe.workflows.train_eval import TrainConfig, run_train
    from hf_wemoe.zeroshot.classifier import parse_named

    config = resolve_options(
        TrainConfig, args, args.config, convert={"task": lambda values: parse_named(values, "--task")}
    )
    summary = run_train(config, progress=False if args.quiet else None)
    if not summary["is_main_process"]:
        return 0
    print(
        f"adapted routers for {summary['steps']} steps on {len(config.task)} tasks "
        f"({summary['processes']} process(es), {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f})"
    )
    if summary["result"] is not None:
        rows = [("adapted", summary["result"].accuracy)]
        if summary.get("baseline") is not None:
            rows.insert(0, ("before adaptation", summary["baseline"].accuracy))
        print(markdown_table(rows, list(summary["result"].accuracy)))
    print(f"saved to {summary['output']}")
    if summary.get("push") is not None:
        print(summary["push"].line())
    return 0
