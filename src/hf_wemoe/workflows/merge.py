"""The merge workflow behind `hf-wemoe merge`: resolve sources, check them, merge, write the folder atomically.

The output is written into a temporary folder beside the target (`<output>.tmp-XXXX`) and renamed into place at
the end, so a failed or interrupted merge leaves no partial output behind. With `full_clip`, the merged vision
tower is combined with the base's text tower into a full CLIP model. The workflow never pushes: `hf-wemoe merge
--push-to-hub` pushes the finished folder afterwards (see `hf_wemoe.hub.push`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.hub.cards import merge_card
from hf_wemoe.io.sources import ModelSource, open_source, parse_reference
from hf_wemoe.io.weights import count_parameters, folder_size
from hf_wemoe.merging.base import MergeJob, Progress, no_progress
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.utils.config_files import dump_yaml
from hf_wemoe.utils.formatting import format_size, parse_size
from hf_wemoe.workflows.full_clip import base_license, check_full_clip_base, write_full_clip

MERGE_CONFIG_NAME = "merge_config.yaml"
PREPROCESSOR_NAME = "preprocessor_config.json"
CARD_NAME = "README.md"

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

    def line(self) -> str:
        """A one-line summary for the command line."""
        return (
            f"merged {len(self.experts)} expert{'s' if len(self.experts) != 1 else ''} ({', '.join(self.experts)}) "
            f"with {self.method} into "
            f"{self.output}: {self.parameters:,} parameters, {format_size(self.size_bytes)} on disk, "
            f"{self.seconds:.1f}s"
        )


def tqdm_progress(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
    """A `Progress` drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True)


def check_compatible(base: ModelSource, experts: dict[str, ModelSource]) -> None:
    """Raise `IncompatibleModelsError` (naming the tensor or config field) unless every expert matches the base."""
    base_keys = set(base.keys)
    for name, expert in experts.items():
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


def run_merge(
    recipe: MergeRecipe,
    output: str | Path | None,
    *,
    overwrite: bool = False,
    show_progress: bool | None = None,
) -> MergeSummary:
    """Merge the experts of `recipe` into its base and write the result to the folder `output`.

    Args:
        recipe: what to merge and how (flags and/or YAML); method defaults are filled in here.
        output: the folder to write; it appears complete or not at all.
        overwrite: replace `output` if it exists (only once the new folder is complete).
        show_progress: draw progress bars on stderr; by default only when stderr is a terminal.

    Raises:
        WEMoEError: bad options, no output, an existing output without `overwrite`, unreadable sources
            (`SourceError`), experts that do not match the base (`IncompatibleModelsError`), a base without text
            tower for `full_clip`.
    """
    start = time.perf_counter()
    options = recipe.resolved()
    if output is None:
        raise WEMoEError("no output folder: pass --output DIR")
    output = Path(output).expanduser().absolute()
    _check_output(output, options, overwrite)
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress
    progress: Progress = tqdm_progress if show_progress else no_progress

    with _quiet_libraries(not show_progress):
        base = open_source(options.base, allow_pickle=options.allow_pickle)
        experts = {
            name: open_source(ref, allow_pickle=options.allow_pickle) for name, ref in options.experts.items()
        }
        check_compatible(base, experts)
        if options.full_clip:
            check_full_clip_base(base)
        recorded = options.to_yaml_dict(
            base=base.reference.pinned(base.commit),
            experts={name: source.reference.pinned(source.commit) for name, source in experts.items()},
        )
        provenance = _provenance(base, experts, recorded)
        method = options.method_class(options)
        job = MergeJob(options=options, base=base, experts=experts, provenance=provenance, progress=progress)
        with _staging_folder(output) as staging:
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
            (staging / MERGE_CONFIG_NAME).write_text(
                dump_yaml(
                    recorded,
                    header=f"hf-wemoe merge recipe ({method.name}). Sources are pinned to the revisions that "
                    "were read.\nRebuild identical weights with: hf-wemoe merge --config merge_config.yaml "
                    "--output DIR",
                )
            )
            merge_card(staging, model_id=output.name).save(staging / CARD_NAME)
            _install(staging, output)
    summary = MergeSummary(
        output=output,
        method=method.name,
        experts=list(experts),
        parameters=count_parameters(output)["total"],
        size_bytes=folder_size(output),
        seconds=time.perf_counter() - start,
    )
    return summary


def _provenance(base: ModelSource, experts: dict[str, ModelSource], recipe: dict[str, Any]) -> dict[str, Any]:
    from hf_wemoe.version import __version__

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


def _check_output(output: Path, options: MergeRecipe, overwrite: bool) -> None:
    """Refuse an existing output without overwrite, a file in the way, or an output that holds a source."""
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise WEMoEError(f"output '{output}' exists and is not a folder; choose another --output")
        if not overwrite:
            raise WEMoEError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    for ref in [options.base, *options.experts.values()]:
        try:
            parsed = parse_reference(ref)
        except WEMoEError:
            continue  # reported when the source is opened
        if parsed.is_local and (parsed.path == output.resolve() or output.resolve() in parsed.path.parents):
            raise WEMoEError(
                f"--output '{output}' would replace the model folder '{ref}'; choose another --output"
            )


@contextlib.contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """A fresh folder beside `output`; removed (with any parent folders created for it) unless installed."""
    created = [parent for parent in [output.parent, *output.parent.parents] if not parent.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    except OSError as err:
        raise WEMoEError(f"cannot create a folder beside '{output}': {err.strerror or err}") from err
    try:
        # mkdtemp creates the folder private (0700); the output gets the permissions of any new folder.
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _install(staging: Path, output: Path) -> None:
    """Rename the finished folder into place, replacing an existing output only once the new one is complete."""
    # Some writers create files through private temporary files (0600); give them the usual permissions.
    for path in staging.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~_umask())
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
    try:
        os.replace(staging, output)
    except BaseException:
        if old is not None:
            os.replace(old / output.name, output)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Silence the download and save progress bars of huggingface_hub and transformers when asked."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_disabled = are_progress_bars_disabled()
    transformers_was_enabled = transformers_logging.is_progress_bar_enabled()
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_disabled:
            enable_progress_bars()
        if transformers_was_enabled:
            transformers_logging.enable_progress_bar()


__all__ = ["MergeSummary", "check_compatible", "format_size", "run_merge", "tqdm_progress"]
