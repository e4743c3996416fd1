"""``hf-wemoe toy-zoo``: build (or reuse) the offline toy zoo of tasks, base CLIP and experts."""

from __future__ import annotations

import argparse
from pathlib import Path

# Kept in sync with hf_wemoe.toy.build.PRESETS; listed here so that building the parser stays import-light.
PRESET_NAMES = ("full", "small")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "toy-zoo",
        help="build the offline toy zoo: small image tasks, a tiny pretrained CLIP and one expert per task",
        description=(
            "Build the toy zoo offline and deterministically: 32x32 image-classification tasks (one from "
            "scikit-learn's handwritten digits, the others procedural) saved as datasets, a tiny CLIP "
            "pretrained on captions of every task, one fine-tuned vision expert per task, and zoo.json with "
            "the measured accuracies (zero-shot, experts, task arithmetic, oracle routing bound). An "
            "existing zoo of the same recipe, preset and seed is reused unless --force is given."
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="zoo folder (default: the cache folder, $HF_WEMOE_CACHE/toy-zoo/<recipe>-<preset>-<seed>)",
    )
    parser.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="full",
        help="full: about 4 minutes on 2 CPU cores; small: about a minute, for tests (default: full)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes fine-tuning experts in parallel (default: one per CPU core, at most 4); the built "
        "files do not depend on it",
    )
    parser.add_argument("--seed", type=int, default=0, help="build seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a zoo")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from hf_wemoe.toy.build import get_toy_zoo
    from hf_wemoe.toy.evaluate_world import format_table

    manifest = get_toy_zoo(
        preset=args.preset,
        seed=args.seed,
        output_dir=args.output,
        progress=False if args.quiet else None,
        force=args.force,
        workers=args.workers,
    )
    recipe = f"{manifest.preset} preset, seed {manifest.seed}, recipe {manifest.recipe_version}"
    print(f"toy zoo ({recipe}): {manifest.root}")
    print(f"base model: {manifest.base_path}")
    print(f"experts: {', '.join(manifest.tasks)} (folders {manifest.base_model}_<task> beside the base)")
    if manifest.timings:
        print(f"built in {manifest.timings.get('total', 0.0):.0f} s")
    print(format_table(manifest.accuracies))
    return 0
