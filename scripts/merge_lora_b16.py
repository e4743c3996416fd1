#!/usr/bin/env python
"""Merge the Hub's eight CLIP ViT-B/16 LoRA experts into one WEMoE model, routing the modules they adapt.

The experts are FusionBench's PEFT LoRA adapters `tanganke/clip-vit-base-patch16_<task>_lora-16` (rank 16 on
every layer's q_proj and v_proj) of `openai/clip-vit-base-patch16`. hf-wemoe reads them as experts, stores each
one exactly as its own rank-16 factors, and routes q_proj and v_proj (`--moe-modules q_proj,v_proj`: with the
default fc1,fc2 no expert would change a routed module). This script runs, and prints first, the command:

    hf-wemoe merge --base openai/clip-vit-base-patch16 --moe-modules q_proj,v_proj \\
        --expert sun397=tanganke/clip-vit-base-patch16_sun397_lora-16 ... --output wemoe-lora-b16

    python scripts/merge_lora_b16.py --output wemoe-lora-b16
    python scripts/merge_lora_b16.py --tasks mnist,svhn --analyze    # two experts, and their task-vector ranks
    python scripts/merge_lora_b16.py --print-only                   # the command, nothing run

It needs network access to the Hugging Face Hub (the base, about 600 MB, and eight adapters of about 2 MB each),
or a cache that holds them (HF_HUB_OFFLINE=1). Then adapt the routers with `hf-wemoe train` (see
scripts/reproduce_ta8.py for the eight tasks' datasets).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hf_wemoe.cli.main import main as hf_wemoe
from hf_wemoe.workflows.suites import TA8_DATASETS

BASE = "openai/clip-vit-base-patch16"
ADAPTER = "tanganke/clip-vit-base-patch16_{task}_lora-16"


def expert_args(tasks: list[str]) -> list[str]:
    """`--expert TASK=ADAPTER` for every task."""
    return [arg for task in tasks for arg in ("--expert", f"{task}={ADAPTER.format(task=task)}")]


def merge_command(tasks: list[str], output: Path, extra: list[str]) -> list[str]:
    """The `hf-wemoe merge` arguments for the LoRA experts of `tasks`."""
    return [
        "merge",
        "--base",
        BASE,
        "--moe-modules",
        "q_proj,v_proj",
        *expert_args(tasks),
        "--output",
        str(output),
        *extra,
    ]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments (e.g. --method e-wemoe, --scaling 0.3, --push-to-hub org/name, -q) are passed on "
        "to hf-wemoe merge.",
    )
    parser.add_argument(
        "--tasks", default=",".join(TA8_DATASETS), help="comma-separated subset of the 8 tasks (default: all)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("wemoe-lora-b16"),
        help="merged model folder (default: %(default)s)",
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="first run hf-wemoe analyze on the adapters (size and rank per layer and module), into OUTPUT-analysis",
    )
    parser.add_argument("--print-only", action="store_true", help="print the commands and run nothing")
    args, extra = parser.parse_known_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = sorted(set(args.tasks) - set(TA8_DATASETS))
    if unknown or not args.tasks:
        parser.error(f"unknown task(s) {unknown}; choose from {','.join(TA8_DATASETS)}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    commands = []
    if args.analyze:
        analysis = args.output.with_name(args.output.name + "-analysis")
        commands.append(["analyze", "--base", BASE, *expert_args(args.tasks), "--output", str(analysis)])
    commands.append(merge_command(args.tasks, args.output, extra))
    for command in commands:
        print("hf-wemoe " + shlex.join(command), flush=True)
        if not args.print_only:
            code = hf_wemoe(command)
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
