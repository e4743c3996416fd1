"""``hf-wemoe eval``: top-1 accuracy of a WEMoE or plain CLIP vision model on zero-shot tasks."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_config_option, add_options, resolve_options
from hf_wemoe.workflows.evaluate import EvalConfig, format_results, run_eval
from hf_wemoe.zeroshot.data import DATASET_REF_HELP
from hf_wemoe.zeroshot.templates import TEMPLATES_HELP

DESCRIPTION = (
    "Print per-task top-1 accuracy and the average as a markdown table and write them as JSON. Works for "
    "WEMoE models, merged static models, experts and the pretrained model alike.\n\n"
    + DATASET_REF_HELP
    + "\n\n"
    + TEMPLATES_HELP
)

EXAMPLES = """\
examples:
  hf-wemoe eval --model wemoe-vit-b32-tta --task mnist=ylecun/mnist --task svhn=ufldl-stanford/svhn:cropped_digits
  hf-wemoe eval --model wemoe-vit-b32-tta --task mnist=ylecun/mnist --task svhn=ufldl-stanford/svhn:cropped_digits \\
      --stream mixed --routing batch       # one shuffled stream of both tasks, routing averaged per batch
  hf-wemoe eval --model tanganke/clip-vit-base-patch32_mnist --clip-model openai/clip-vit-base-patch32 \\
      --task mnist=ylecun/mnist --templates mnist --output-json expert.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_options(parser, [EvalConfig], first=["model", "task", "output_json"])


def run(args: argparse.Namespace) -> int:
    (config,) = resolve_options(args, EvalConfig)
    result = run_eval(config, progress=False if args.quiet else None)
    print(format_results(result, config.model))
    print(f"results written to {config.output_json}")
    return 0
