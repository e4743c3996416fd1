"""``hf-wemoe merge``: build a WEMoE / E-WEMoE model, or a static merge, from a base and its experts.

The flags come from two typed objects: the recipe (`hf_wemoe.merging.recipe.MergeRecipe`: what is merged and
how, exactly what `merge_config.yaml` records) and the run options (`MergeRunOptions`: where the result goes,
whether its routers are calibrated and whether it is pushed). `--config` reads a YAML file with the names of either.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from hf_wemoe.cli.options import add_config_option, add_options, resolve_options
from hf_wemoe.cli.push import PushToHubOptions, check_push_target, push_output
from hf_wemoe.errors import WEMoEError
from hf_wemoe.hub.push import PushResult
from hf_wemoe.merging.recipe import MergeRecipe, method_option_help
from hf_wemoe.workflows.calibrate import CalibrationRequest
from hf_wemoe.workflows.merge import MergeSummary, run_merge
from hf_wemoe.zeroshot.classifier import parse_named

DESCRIPTION = """\
Merge CLIP vision experts fine-tuned from one base model. The default method, wemoe, writes a
weight-ensembling mixture-of-experts model (config, safetensors weights, model code, preprocessor config,
merge_config.yaml and a model card) that AutoModel loads with trust_remote_code=True; the static methods
write a plain CLIPVisionModel. REF is a Hub repo id with an optional @revision (org/name@revision) or a
local folder; checkpoints may be CLIPVisionModel (transformers 4 or 5 layout) or full CLIPModel, and
experts may also be PEFT LoRA adapters of the base (adapter_config.json + adapter_model.safetensors), alone or
mixed with full fine-tunes: they are stored as their exact low-rank factors (see --rank and --moe-modules).
merge_config.yaml records the recipe (sources pinned to the revisions read, method and options, shard size);
--config reads it back.
"""

EXAMPLES = """\
examples:
  hf-wemoe merge --base openai/clip-vit-base-patch32 \\
      --expert mnist=tanganke/clip-vit-base-patch32_mnist \\
      --expert svhn=tanganke/clip-vit-base-patch32_svhn --output wemoe-vit-b32
  hf-wemoe merge --config wemoe-vit-b32/merge_config.yaml --output rebuilt   # same weights again
  hf-wemoe merge --base openai/clip-vit-base-patch32 --expert mnist=... --expert svhn=... --output wemoe-cal \\
      --calibrate mnist=ylecun/mnist#train --calibrate svhn=ufldl-stanford/svhn:cropped_digits#train
  hf-wemoe merge --base openai/clip-vit-base-patch32 --expert ... --output wemoe-clip --full-clip \\
      --push-to-hub my-org/wemoe-clip       # zero-shot pipelines and widget, pushed with its card
  hf-wemoe merge --base openai/clip-vit-base-patch16 --moe-modules q_proj,v_proj --output wemoe-lora-b16 \\
      --expert mnist=tanganke/clip-vit-base-patch16_mnist_lora-16 \\
      --expert svhn=tanganke/clip-vit-base-patch16_svhn_lora-16    # LoRA experts: routed q/v, rank 16, exact
  hf-wemoe merge --base openai/clip-vit-base-patch32 --expert ... --rank 32 --output wemoe-r32   # low-rank
"""


class MergeRunOptions(PushToHubOptions):
    """How one merge runs, apart from its recipe: the output folder, a router calibration of the merged model, and
    whether it is pushed to the Hub (config.json records a calibration under `provenance.calibration`)."""

    model_config = ConfigDict(extra="forbid")

    output: Path | None = Field(
        default=None,
        description="folder to write the merged model to (written beside it under a temporary name and "
        "renamed when complete)",
        json_schema_extra={"metavar": "DIR", "required": True},
    )
    overwrite: bool = Field(default=False, description="replace the output folder if it exists")
    calibrate: dict[str, str] = Field(
        default_factory=dict,
        description="after merging, set the routers so that the images of DATASET route to expert NAME, from a few "
        "unlabelled ones, without training (repeatable; wemoe and e-wemoe)",
        json_schema_extra={"metavar": "NAME=DATASET"},
    )
    calibration_images: int = Field(
        default=64,
        ge=1,
        le=64,
        description="unlabelled images per --calibrate task",
    )

    @field_validator("calibrate", mode="before")
    @classmethod
    def _calibrate_from_list(cls, value: Any) -> Any:
        # Flags (and YAML files) may list calibration tasks as NAME=DATASET strings.
        if isinstance(value, (list, tuple)):
            try:
                return parse_named([str(item) for item in value], "--calibrate")
            except WEMoEError as err:
                raise ValueError(str(err)) from None
        return value

    def calibration(self) -> CalibrationRequest | None:
        """The calibration to run on the merged model, if any."""
        if not self.calibrate:
            return None
        return CalibrationRequest(dict(self.calibrate), images_per_task=self.calibration_images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(
        parser, "e.g. the merge_config.yaml of a merged model (base, experts as NAME: REF, ...)"
    )
    notes: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for name in MergeRecipe.model_fields:
        note, default = method_option_help(name)
        notes[name] = note
        if default is not None:
            defaults[name] = default
    add_options(
        parser,
        [MergeRecipe, MergeRunOptions],
        first=["base", "experts", "output", "method"],
        notes=notes,
        default_texts=defaults,
    )


def merge(
    recipe: MergeRecipe, run_options: MergeRunOptions, show_progress: bool | None = None
) -> tuple[MergeSummary, PushResult | None]:
    """Merge, then push when `run_options.push_to_hub` is set: the summary and the push result (or None).

    The repo id and the token are checked before merging; a failed push keeps the merged folder and says how to
    retry.
    """
    check_push_target(run_options)
    summary = run_merge(
        recipe,
        run_options.output,
        overwrite=run_options.overwrite,
        show_progress=show_progress,
        calibration=run_options.calibration(),
    )
    pushed = push_output(
        summary.output, run_options, done=f"merged into {summary.output}", show_progress=show_progress
    )
    return summary, pushed


def run(args: argparse.Namespace) -> int:
    recipe, run_options = resolve_options(args, MergeRecipe, MergeRunOptions)
    summary, pushed = merge(recipe, run_options, show_progress=False if args.quiet else None)
    print(summary.line())
    if pushed is not None:
        print(pushed.line())
    return 0
