"""``hf-wemoe calibrate``: set the routers of a WEMoE model from a few unlabelled images per task, and optionally
push it."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_config_option, add_options, resolve_options
from hf_wemoe.cli.push import PushToHubOptions, check_push_target, print_adapted, push_output
from hf_wemoe.hub.push import PushResult
from hf_wemoe.workflows.calibrate import CalibrateConfig, CalibrateSummary, run_calibrate
from hf_wemoe.zeroshot.data import DATASET_REF_HELP
from hf_wemoe.zeroshot.templates import TEMPLATES_HELP

DESCRIPTION = (
    "Set the routers of a WEMoE model without training, so that each task's images route to the expert of the "
    "same name: one forward pass over a few unlabelled images per task (at most 64) fits every router's output "
    "layer in closed form (ridge regression to the task's expert). Writes the calibrated model, eval_results.json "
    "(with the model before calibration as a baseline) and routing.png to --output; `hf-wemoe train` can start "
    "from it.\n\n" + DATASET_REF_HELP + "\n\n" + TEMPLATES_HELP
)

EXAMPLES = """\
examples:
  hf-wemoe calibrate --model wemoe-vit-b32 --task sun397=tanganke/sun397#train \\
      --task svhn=ufldl-stanford/svhn:cropped_digits#train --output wemoe-vit-b32-cal
  hf-wemoe calibrate --config calibrate.yaml --calibration-images 16 --no-evaluate
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_options(parser, [CalibrateConfig, PushToHubOptions], first=["model", "task", "output"])


def calibrate(
    config: CalibrateConfig, hub: PushToHubOptions, progress: bool | None = None
) -> tuple[CalibrateSummary, PushResult | None]:
    """Calibrate the routers, then push the calibrated folder when `hub.push_to_hub` is set.

    The repo id and the token are checked first; a failed push keeps the folder and says how to retry.
    """
    check_push_target(hub)
    summary = run_calibrate(config, progress=progress)
    pushed = push_output(
        summary.output,
        hub,
        done=f"saved the calibrated model to {summary.output}",
        show_progress=progress,
    )
    return summary, pushed


def run(args: argparse.Namespace) -> int:
    config, hub = resolve_options(args, CalibrateConfig, PushToHubOptions)
    summary, pushed = calibrate(config, hub, progress=False if args.quiet else None)
    names = ("before calibration", "calibrated")
    print_adapted(summary.line(), summary.result, summary.baseline, names, summary.output, pushed)
    return 0
