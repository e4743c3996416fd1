"""``hf-wemoe analyze``: how large and how low-rank the experts' task vectors are, per layer and module."""

from __future__ import annotations

import argparse

from hf_wemoe.cli.options import add_config_option, add_options, resolve_options
from hf_wemoe.workflows.analyze import AnalyzeConfig, run_analyze

DESCRIPTION = """\
Measure each expert's task vector tau = theta_k - theta_0 in every encoder layer's q_proj, k_proj, v_proj,
out_proj, fc1 and fc2: its size relative to the pretrained weight, ||tau|| / ||W0|| (Frobenius norms), and the
rank that keeps --energy (default 90%) of its energy ||tau||^2. The rank tells what `hf-wemoe merge --rank R`
keeps of each expert; the sizes tell which modules the experts changed most (candidates for --moe-modules).
Experts may be full fine-tunes or PEFT LoRA adapters of the base (REF holding adapter_config.json), mixed.
Tensors are read one at a time. Prints the tables (markdown); with --output, writes analysis.md, analysis.json
and analysis.png (one column per module, a line per expert) to that folder.
"""

EXAMPLES = """\
examples:
  hf-wemoe analyze --base openai/clip-vit-base-patch32 \\
      --expert mnist=tanganke/clip-vit-base-patch32_mnist --expert svhn=tanganke/clip-vit-base-patch32_svhn
  hf-wemoe analyze --base openai/clip-vit-base-patch16 \\
      --expert mnist=tanganke/clip-vit-base-patch16_mnist_lora-16 --energy 0.99 --output analysis-b16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_options(parser, [AnalyzeConfig], first=["base", "experts", "output", "energy"])


def run(args: argparse.Namespace) -> int:
    (config,) = resolve_options(args, AnalyzeConfig)
    summary = run_analyze(config, show_progress=False if args.quiet else None)
    print(summary.markdown())
    print(summary.line())
    return 0
