"""``hf-wemoe toy-zoo``: build (or reuse) the offline toy zoo of tasks, base CLIP and experts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.cli.options import add_options, resolve_options

# The names of hf_wemoe.toy.build.PRESETS, listed here so that building the parser does not load the toy zoo
# (and torch); a test checks that the two agree.
PRESET_NAMES = ("full", "plain", "small")
Preset = Literal[PRESET_NAMES]  # type: ignore[valid-type]

DESCRIPTION = """\
Build the toy zoo offline and deterministically: 32x32 image-classification tasks (one from scikit-learn's
handwritten digits, the others procedural) saved as datasets, a tiny CLIP pretrained on captions of every task,
one fine-tuned vision expert per task, and zoo.json with the measured accuracies (zero-shot, experts, task
arithmetic, oracle routing bound). An existing zoo of the same recipe, preset and seed is reused unless --force
is given.
"""

EXAMPLES = """\
examples:
  hf-wemoe toy-zoo                              # the full preset in the cache folder
  hf-wemoe toy-zoo --preset plain                # the world built plainly
  hf-wemoe toy-zoo --preset small --output toy-zoo-small
"""


class ToyZooOptions(BaseModel):
    """`hf-wemoe toy-zoo` options."""

    model_config = ConfigDict(extra="forbid")

    output: Path | None = Field(
        None,
        description="zoo folder",
        json_schema_extra={
            "metavar": "DIR",
            "default_text": "the cache folder, $HF_WEMOE_CACHE/toy-zoo/<recipe>-<preset>-<seed>",
        },
    )
    preset: Preset = Field(
        "full",
        description="full: about 4 minutes on 2 CPU cores; plain: the same recipe built plainly (no "
        "feature-preservation term, experts at CLIP's usual logit scale), where entropy adaptation collapses; "
        "small: about a minute, for tests",
    )
    workers: int | None = Field(
        None,
        description="processes fine-tuning experts in parallel; the built files do not depend on it",
        json_schema_extra={"default_text": "one per CPU core, at most 4"},
    )
    seed: int = Field(0, description="build seed")
    force: bool = Field(False, description="rebuild even if the folder holds a zoo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, [ToyZooOptions])


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the toy zoo loads torch, which `hf-wemoe toy-zoo --help` does not need.
    from hf_wemoe.toy.build import get_toy_zoo
    from hf_wemoe.toy.evaluate_world import format_table

    (options,) = resolve_options(args, ToyZooOptions)
    manifest = get_toy_zoo(
        preset=options.preset,
        seed=options.seed,
        output_dir=options.output,
        progress=False if args.quiet else None,
        force=options.force,
        workers=options.workers,
    )
    recipe = f"{manifest.preset} preset, seed {manifest.seed}, recipe {manifest.recipe_version}"
    print(f"toy zoo ({recipe}): {manifest.root}")
    print(f"base model: {manifest.base_path}")
    print(f"experts: {', '.join(manifest.tasks)} (folders {manifest.base_model}_<task> beside the base)")
    if manifest.timings:
        print(f"built in {manifest.timings.get('total', 0.0):.0f} s")
    print(format_table(manifest.accuracies))
    return 0
