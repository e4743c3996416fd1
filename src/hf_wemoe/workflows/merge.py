"""The merge workflow behind `hf-wemoe merge`: resolve sources, check them, merge, write the folder atomically.

The output is written into a hidden staging folder beside the target and renamed into place at the end
(`hf_wemoe.io.outputs.atomic_output_dir`), so a failed or interrupted merge leaves no partial output behind.
With `full_clip`, the merged vision tower is combined with the base's text tower into a full CLIP model. The
workflow never pushes: `hf-wemoe merge --push-to-hub` pushes the finished folder afterwards (see
`hf_wemoe.hub.push`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_wemoe.calibration import CalibrationSummary, check_calibration
from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.hub.cards import merge_card
from hf_wemoe.io.adapters import AdapterSource, module_weight_key, open_expert
from hf_wemoe.io.layout import CARD_NAME, MERGE_CONFIG_NAME, PREPROCESSOR_NAME
from hf_wemoe.io.outputs import atomic_output_dir, check_output_dir
from hf_wemoe.io.sources import ModelSource, open_source, parse_reference
from hf_wemoe.io.weights import count_parameters, folder_size
from hf_wemoe.merging.base import MergeJob, Progress
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.models.configuration_wemoe import DEFAULT_MOE_MODULES, MOE_MODULES
from hf_wemoe.utils.config_files import dump_yaml
from hf_wemoe.utils.formatting import format_size, parse_size
from hf_wemoe.utils.progress import progress, progress_enabled, quiet_libraries
from hf_wemoe.version import __version__
from hf_wemoe.workflows.calibrate import CalibrationRequest, calibrate_merged_folder, load_calibration_data
from hf_wemoe.workflows.full_clip import base_license, check_full_clip_base, write_full_clip

# Config fields that change what a model computes without changing any tensor shape.
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


@dataclass
class MergeSummary:
    """What a merge produced."""

    output: Path
    method: str
    experts: list[str]
    parameters: int
    size_bytes: int
    seconds: float
    calibration: CalibrationSummary | None = None
    """The router calibration run on the merged model (`--calibrate`), if any."""

    def line(self) -> str:
        """A one-line summary for the command line (two lines after a calibration)."""
        text = (
            f"merged {len(self.experts)} expert{'s' if len(self.experts) != 1 else ''} ({', '.join(self.experts)}) "
            f"with {self.method} into "
            f"{self.output}: {self.parameters:,} parameters, {format_size(self.size_bytes)} on disk, "
            f"{self.seconds:.1f}s"
        )
        return text if self.calibration is None else f"{text}\n{self.calibration.line()}"


def merge_progress(show: bool | None = None) -> Progress:
    """The `Progress` of a merge under the package's progress policy (`hf_wemoe.utils.progress`)."""

    def report(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
        return progress(iterable, description, total, unit="tensor", show=show)

    return report


def check_compatible(base: ModelSource, experts: dict[str, ModelSource | AdapterSource]) -> None:
    """Raise `IncompatibleModelsError` (naming the tensor or config field) unless every expert matches the base.

    LoRA adapters were checked against the base when they were opened (`open_expert`): they have its tensors.
    """
    base_keys = set(base.keys)
    for name, expert in experts.items():
        if isinstance(expert, AdapterSource):
            continue
        expert_keys = set(expert.keys)
        for key in base.keys:
            if key not in expert_keys:
                raise IncompatibleModelsError(
                    f"expert '{name}' ({expert.reference.text}) lacks tensor '{key}' of the base; experts must be "
                    "fine-tuned from the same architecture as the base"
                )
            if expert.shape(key) != base.shape(key):
                raise IncompatibleModelsError(
                    f"expert '{name}' ({expert.reference.text}) tensor '{key}' has shape {expert.shape(key)}, "
                    f"the base has {base.shape(key)}; experts must be fine-tuned from the same architecture as "
                    "the base"
                )
        extra = [key for key in expert.keys if key not in base_keys]
        if extra:
            raise IncompatibleModelsError(
                f"expert '{name}' ({expert.reference.text}) has tensor '{extra[0]}' that the base lacks; experts "
                "must be fine-tuned from the same architecture as the base"
            )
        for field in _ARCHITECTURE_FIELDS:
            ours, theirs = getattr(base.config, field, None), getattr(expert.config, field, None)
            if ours != theirs:
                raise IncompatibleModelsError(
                    f"expert '{name}' ({expert.reference.text}) has {field}={theirs!r}, the base has {ours!r}; "
                    "experts must be fine-tuned from the same architecture as the base"
                )


def low_rank_options(
    options: MergeRecipe,
    base: ModelSource,
    experts: dict[str, ModelSource | AdapterSource],
    sparsity_given: bool = False,
) -> MergeRecipe:
    """The resolved recipe of a WEMoE merge with its rank settled by the experts, checked against the base.

    With PEFT LoRA experts a merge is low-rank: `rank` (what the full fine-tunes among the experts are truncated
    to) defaults to the largest LoRA rank, and sparsity is off. The stored rank is then max(rank, LoRA ranks)
    (see `WEMoE.write`). Static methods pass through unchanged (LoRA experts are merged into the base weights).

    Raises:
        WEMoEError: --sparsity with LoRA experts; routed modules that no expert changes (all experts are LoRA
            adapters of other modules; the message names `--moe-modules` for theirs); a rank larger than a routed
            weight allows (names the tensor).
    """
    if not options.method_class.is_moe:
        return options
    adapters = [source for source in experts.values() if isinstance(source, AdapterSource)]
    modules = options.moe_modules or list(DEFAULT_MOE_MODULES)
    if adapters:
        if sparsity_given and options.sparsity:
            raise WEMoEError(
                f"--sparsity {options.sparsity} does not apply to a merge with LoRA experts, which are stored as "
                "their exact low-rank factors; drop --sparsity (or use --rank for the full fine-tunes)"
            )
        if len(adapters) == len(experts) and not any(set(a.targets) & set(modules) for a in adapters):
            adapted = [name for name in MOE_MODULES if any(name in a.targets for a in adapters)]
            raise WEMoEError(
                f"no expert changes the routed modules ({','.join(modules)}): the LoRA experts adapt "
                f"{','.join(adapted)} only; route those with --moe-modules {','.join(adapted)}"
            )
        options = options.model_copy(
            update={"rank": options.rank or max(a.rank for a in adapters), "sparsity": 0.0}
        )
    if options.rank is None:
        return options
    for module in modules:
        key = module_weight_key(0, module)
        out_features, in_features = base.shape(key)
        limit = min(out_features, in_features)
        for name, source in experts.items():
            if isinstance(source, AdapterSource) and source.rank > limit:
                raise WEMoEError(
                    f"expert '{name}' has LoRA rank {source.rank}, larger than the routed tensor '{key}' "
                    f"({out_features}x{in_features}) can store (at most {limit}); route other modules"
                )
        if options.rank > limit:
            raise WEMoEError(
                f"--rank {options.rank} is larger than the routed tensor '{key}' ({out_features}x{in_features}) "
                f"allows: at most {limit}"
            )
    return options


def run_merge(
    recipe: MergeRecipe,
    output: str | Path | None,
    *,
    overwrite: bool = False,
    show_progress: bool | None = None,
    calibration: CalibrationRequest | None = None,
) -> MergeSummary:
    """Merge the experts of `recipe` into its base and write the result to the folder `output`.

    Args:
        recipe: what to merge and how (flags and/or YAML); method defaults are filled in here.
        output: the folder to write; it appears complete or not at all.
        overwrite: replace `output` if it exists (only once the new folder is complete).
        show_progress: report progress on stderr (a bar on a terminal, log lines elsewhere); by default unless
            `--quiet` or `HF_HUB_DISABLE_PROGRESS_BARS` (see `hf_wemoe.utils.progress`).
        calibration: calibrate the routers of the merged model before the folder is put in place (WEMoE methods
            only); its datasets are read before merging, so a bad reference fails at once.

    Raises:
        WEMoEError: bad options, no output, an existing output without `overwrite`, unreadable sources
            (`SourceError`), experts that do not match the base (`IncompatibleModelsError`), a base without text
            tower for `full_clip`, a calibration that a static method or the routers cannot take.
    """
    start = time.perf_counter()
    options = recipe.resolved()
    if output is None:
        raise WEMoEError("no output folder: pass --output DIR")
    output = Path(output).expanduser().absolute()
    check_output_beside_sources(output, [options.base, *options.experts.values()], overwrite)
    show_progress = progress_enabled(show_progress)
    if calibration is not None:
        _check_calibration(options, calibration)

    with quiet_libraries(show_progress):
        calibration_data = load_calibration_data(calibration.datasets) if calibration is not None else None
        base = open_source(options.base, allow_pickle=options.allow_pickle)
        experts = {
            name: open_expert(ref, base, allow_pickle=options.allow_pickle)
            for name, ref in options.experts.items()
        }
        check_compatible(base, experts)
        options = low_rank_options(options, base, experts, sparsity_given=recipe.sparsity is not None)
        if options.full_clip:
            check_full_clip_base(base)
        recorded = options.to_yaml_dict(
            base=base.reference.pinned(base.commit),
            experts={name: source.reference.pinned(source.commit) for name, source in experts.items()},
        )
        provenance = _provenance(base, experts, recorded)
        method = options.method_class(options)
        job = MergeJob(
            options=options,
            base=base,
            experts=experts,
            provenance=provenance,
            progress=merge_progress(show_progress),
        )
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            if options.full_clip:
                vision_folder = staging / "vision-tower"
                vision_folder.mkdir()
                method.write(job, vision_folder)
                write_full_clip(vision_folder, base, staging, parse_size(options.max_shard_size))
                shutil.rmtree(vision_folder)
            else:
                method.write(job, staging)
            if base.preprocessor_config is not None:
                shutil.copyfile(base.preprocessor_config, staging / PREPROCESSOR_NAME)
            calibrated = None
            if calibration is not None and calibration_data is not None:
                calibrated = calibrate_merged_folder(
                    staging,
                    calibration,
                    calibration_data,
                    processor_refs=(options.base,),
                    progress=show_progress,
                )
            (staging / MERGE_CONFIG_NAME).write_text(
                dump_yaml(
                    recorded,
                    header=f"hf-wemoe merge recipe ({method.name}). Sources are pinned to the revisions that "
                    "were read.\nRebuild identical weights with: hf-wemoe merge --config merge_config.yaml "
                    "--output DIR",
                )
            )
            merge_card(staging, model_id=output.name).save(staging / CARD_NAME)
    summary = MergeSummary(
        output=output,
        method=method.name,
        experts=list(experts),
        parameters=count_parameters(output)["total"],
        size_bytes=folder_size(output),
        seconds=time.perf_counter() - start,
        calibration=calibrated,
    )
    return summary


def _provenance(base: ModelSource, experts: dict[str, ModelSource], recipe: dict[str, Any]) -> dict[str, Any]:
    provenance = {
        "base": base.provenance(),
        "experts": {name: source.provenance() for name, source in experts.items()},
        "recipe": recipe,
        "hf_wemoe_version": __version__,
    }
    # Merged models inherit the base's license; the model card states it.
    license_info = base_license(base)
    if license_info:
        provenance["base_license"] = license_info
    return provenance


def _check_calibration(options: MergeRecipe, calibration: CalibrationRequest) -> None:
    """Refuse a calibration the merge cannot take, before anything is read."""
    if not options.method_class.is_moe:
        raise WEMoEError(
            f"--calibrate sets the routers of a WEMoE model; --method {options.method} writes a static model "
            "without routers (use --method wemoe or e-wemoe)"
        )
    check_calibration(
        list(options.experts), options.router_depth, list(calibration.datasets), calibration.images_per_task
    )


def check_output_beside_sources(output: Path, refs: Iterable[str], overwrite: bool) -> None:
    """Refuse an existing output without overwrite, a file in the way, a place where nothing can be written, or an
    output that holds one of the source references `refs` (it would be replaced)."""
    check_output_dir(output, overwrite)
    for ref in refs:
        try:
            parsed = parse_reference(ref)
        except WEMoEError:
            continue  # reported when the source is opened
        if parsed.is_local and (parsed.path == output.resolve() or output.resolve() in parsed.path.parents):
            raise WEMoEError(
                f"--output '{output}' would replace the model folder '{ref}'; choose another --output"
            )


__all__ = [
    "MergeSummary",
    "check_compatible",
    "check_output_beside_sources",
    "low_rank_options",
    "merge_progress",
    "run_merge",
]
