"""``hf-wemoe eval``: top-1 accuracy of a WEMoE or plain CLIP vision model on zero-shot tasks."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_options, resolve_options
from hf_wemoe.zeroshot.data import DATASET_REF_HELP
from hf_wemoe.zeroshot.templates import TEMPLATES_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    from hf_wemoe.workflows.train_eval import EvalConfig

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a WEMoE model or a plain CLIP vision model (zero-shot heads, top-1 accuracy)",
        description=(
            "Print per-task top-1 accuracy and the average as a markdown table and write them as JSON. Works for "
            "WEMoE models, merged static models, experts and the pretrained model alike.\n\n"
            + DATASET_REF_HELP
            + "\n\n"
            + TEMPLATES_HELP
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_options(
        parser,
        EvalConfig,
        first=["model", "task", "output_json"],
        metavars={"task": "NAME=DATASET", "model": "REF"},
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from hf_wemoe.workflows.train_eval import EvalConfig, format_results, run_eval
    from hf_wemoe.zeroshot.classifier import parse_named

    config = resolve_options(
        EvalConfig, args, args.config, convert={"task": lambda v: parse_named(v, "--task")}
    )
    result = run_eval(config, progress=False if args.quiet else None)
    print(format_results(result, config.model))
    print(f"results written to {config.output_json}")
    return 0
