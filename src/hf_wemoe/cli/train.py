"""``hf-wemoe train``: adapt the routers of a WEMoE model on unlabelled task data, and optionally push it."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_config_option, add_options, resolve_options
from hf_wemoe.cli.push import PushToHubOptions, check_push_target, print_adapted, push_output
from hf_wemoe.hub.push import PushResult
from hf_wemoe.workflows.train import TrainConfig, TrainSummary, run_train
from hf_wemoe.zeroshot.data import DATASET_REF_HELP
from hf_wemoe.zeroshot.templates import TEMPLATES_HELP

DESCRIPTION = (
    "Train only the routers of a WEMoE model: every step takes one batch from every task and minimises the "
    "entropy of the zero-shot predictions (the papers' objective), an information-maximisation loss that "
    "cannot collapse onto a few classes (--objective infomax), or the cross-entropy (--objective supervised); "
    "--routing-loss adds a term pulling each task's images towards its own expert. A fixed probe set watches "
    "every task: a task whose predictions collapse onto a few classes is named in a warning, and --keep-best "
    "keeps the routers with the most information between images and predictions. Writes the adapted model, "
    "eval_results.json (with the probe's trajectory) and routing.png to --output.\n\n"
    + DATASET_REF_HELP
    + "\n\n"
    + TEMPLATES_HELP
)

EXAMPLES = """\
examples:
  hf-wemoe train --model wemoe-vit-b32 --task sun397=tanganke/sun397 --task svhn=ufldl-stanford/svhn:cropped_digits \\
      --output wemoe-vit-b32-tta
  hf-wemoe train --model wemoe-toy --task digits=toy/digits --task colors=toy/colors --output adapted \\
      --objective infomax --routing-loss 1 --keep-best          # adaptation that does not collapse
  accelerate launch -m hf_wemoe train --config train.yaml          # several processes / GPUs
  torchrun --nproc_per_node 2 -m hf_wemoe train --config train.yaml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_options(parser, [TrainConfig, PushToHubOptions], first=["model", "task", "output"])


def train(
    config: TrainConfig, hub: PushToHubOptions, progress: bool = True
) -> tuple[TrainSummary, PushResult | None]:
    """Adapt the routers, then push the adapted folder when `hub.push_to_hub` is set (main process only).

    The repo id and the token are checked before training; a failed push keeps the folder and says how to retry.
    """
    check_push_target(hub)
    summary = run_train(config, progress=progress)
    if not summary.is_main_process or summary.output is None:
        return summary, None
    pushed = push_output(
        summary.output,
        hub,
        done=f"saved the adapted model to {summary.output}",
        show_progress=None if progress else False,
    )
    return summary, pushed


def run(args: argparse.Namespace) -> int:
    config, hub = resolve_options(args, TrainConfig, PushToHubOptions)
    summary, pushed = train(config, hub, progress=False if args.quiet else None)
    if not summary.is_main_process:
        return 0
    names = ("before adaptation", "adapted")
    print_adapted(summary.line(), summary.result, summary.baseline, names, summary.output, pushed)
    return 0
