"""Zero-shot image classification with a (WEMoE or plain) CLIP vision tower: what train and eval share.

A task is a name, a dataset split, class names and prompt templates; its classifier head comes from the
pretrained CLIP text tower. The vision side is any CLIP vision tower plus the base model's `visual_projection`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.io.pretrained import load_config, load_model, locate_pretrained
from hf_wemoe.io.sources import parse_reference
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.utils.formatting import first_line
from hf_wemoe.utils.progress import progress_enabled, quiet_libraries
from hf_wemoe.zeroshot.data import (
    ImageClassificationDataset,
    TaskData,
    check_label_range,
    load_task_dataset,
    parse_dataset_ref,
)
from hf_wemoe.zeroshot.heads import ZeroShotHead, load_or_build_heads
from hf_wemoe.zeroshot.templates import load_classnames, resolve_task_templates


@dataclass
class ClassificationTask:
    """One task ready to run: its data (images preprocessed lazily) and its zero-shot head."""

    name: str
    data: TaskData
    dataset: ImageClassificationDataset
    head: ZeroShotHead


def parse_named(values: Sequence[str] | None, what: str) -> dict[str, str]:
    """Parse repeated `NAME=VALUE` arguments into an ordered dict, refusing malformed or duplicate names."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise WEMoEError(f"{what} {value!r} is not NAME=VALUE")
        if name in out:
            raise WEMoEError(f"{what} name {name!r} is given twice; names must be unique")
        out[name.strip()] = rest.strip()
    return out


def per_task_option(
    value: str | Sequence[str] | None, tasks: Sequence[str], what: str
) -> dict[str, str | None]:
    """`--templates`/`--classnames` values: one `VALUE` for every task, or `TASK=VALUE` entries."""
    values = [value] if isinstance(value, str) else list(value or [])
    per_task: dict[str, str] = {}
    default = None
    for item in values:
        name, sep, rest = item.partition("=")
        if sep and name in tasks:
            per_task[name] = rest
        else:
            default = item
    return {task: per_task.get(task, default) for task in tasks}


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (`org/name`, `revision`); a local folder -> (its path, None)."""
    parsed = parse_reference(ref)
    return (str(parsed.path), None) if parsed.is_local else (parsed.repo_id, parsed.revision)


def load_vision_model(
    ref: str, dtype: torch.dtype | None = None, *, allow_pickle: bool = False
) -> tuple[nn.Module, nn.Linear | None]:
    """Load a vision tower: a WEMoE model, a `CLIPVisionModel`, or a full `CLIPModel` (its vision tower).

    Returns `(vision_model, visual_projection)`; the projection is None unless the checkpoint has one. The
    weights must fit the config exactly, and pickle weights load only with `allow_pickle` (see
    `hf_wemoe.io.pretrained`).

    Raises:
        SourceError: a missing folder, an unreachable or unknown Hub repo, refused pickle weights, a config that
            is invalid or does not match the weights (naming the first tensor), a corrupt file.
        WEMoEError: a model that is not a CLIP vision tower.
    """
    from transformers import AutoModel, CLIPModel, CLIPVisionModel

    location = locate_pretrained(ref, allow_pickle=allow_pickle)
    config = load_config(location)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if config.model_type in ("clip", "wemoe_clip"):  # a full CLIP (with a plain or a WEMoE vision tower)
        clip = load_model(CLIPModel if config.model_type == "clip" else AutoModel, location, **kwargs)
        return clip.vision_model, clip.visual_projection
    if config.model_type == "clip_vision_model":
        # A CLIPVisionModelWithProjection checkpoint also holds a projection; the base's is used, as always.
        model = load_model(CLIPVisionModel, location, ignore_unexpected=("visual_projection.",), **kwargs)
        return model, None
    model = load_model(AutoModel, location, **kwargs)
    if not isinstance(model, WEMoECLIPVisionModel):
        raise WEMoEError(f"{ref} is a {type(model).__name__}; expected a CLIP vision tower or a WEMoE model")
    return model, None


def load_visual_projection(clip_ref: str, *, allow_pickle: bool = False) -> nn.Linear:
    """The `visual_projection` of a full CLIP model (the base the experts were fine-tuned from)."""
    from transformers import CLIPModel

    try:
        location = locate_pretrained(clip_ref, allow_pickle=allow_pickle)
        config = load_config(location, "the CLIP model")
        if config.model_type != "clip":
            raise SourceError(
                f"{clip_ref} is a {config.model_type!r} model, not a full CLIP model with a text tower and a "
                "visual projection"
            )
        return load_model(CLIPModel, location, "the CLIP model").visual_projection
    except SourceError as err:
        raise SourceError(
            f"{err} (the text tower and visual projection of the CLIP model the experts were fine-tuned from give "
            "the zero-shot heads; name it with --clip-model)"
        ) from err


def check_projection(vision_model: nn.Module, projection: nn.Linear, model_ref: str, clip_ref: str) -> None:
    """Raise `WEMoEError` naming both models when the projection does not take the vision tower's output."""
    hidden = getattr(vision_model.config, "hidden_size", None)
    if hidden is not None and projection.in_features != hidden:
        raise WEMoEError(
            f"the visual projection of {clip_ref} takes {projection.in_features} features, but {model_ref} outputs "
            f"{hidden}: the two models do not belong together; name the CLIP model its experts were fine-tuned "
            "from with --clip-model"
        )


def default_clip_ref(
    model: nn.Module, model_ref: str, clip_ref: str | None, *, has_text_tower: bool = False
) -> str:
    """`--clip-model`, else the base recorded in a WEMoE model's provenance, else the model itself when it is a
    full CLIP model (`has_text_tower`): the pretrained CLIP evaluates with its own text tower."""
    if clip_ref:
        return clip_ref
    recorded = getattr(model.config, "base_model_ref", None)
    if recorded:
        return recorded
    if has_text_tower:
        return model_ref
    raise WEMoEError(
        f"{model_ref} records no base model; name the CLIP model whose text tower gives the zero-shot heads "
        "with --clip-model (e.g. openai/clip-vit-base-patch32)"
    )


def prepare_tasks(
    tasks: dict[str, str],
    clip_ref: str,
    image_processor: Any,
    templates: str | Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    classnames: str | Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
    progress: bool | None = None,
    check_labels: bool | None = None,
    allow_pickle: bool = False,
) -> list[ClassificationTask]:
    """Load every task's data and build (or fetch from the cache) its zero-shot head.

    `templates` and `classnames` are command-line values (one `VALUE` for every task, or `TASK=VALUE` entries);
    `templates` may also map task names to their templates, given as lists. `progress` reports downloads and
    head building under the package's progress policy (None: follow it; False: nothing). With `check_labels`
    (default: `require_labels`), every label must be a class of the task's head: labels beyond the class names
    would give a meaningless accuracy or break supervised training.
    """
    check_labels = require_labels if check_labels is None else check_labels
    names = list(tasks)
    if isinstance(templates, Mapping):
        template_args = {name: templates.get(name) for name in names}
    else:
        template_args = per_task_option(templates, names, "--templates")
    classname_args = per_task_option(classnames, names, "--classnames")
    with quiet_libraries(progress, datasets=True):
        loaded, specs = _load_tasks(
            tasks, template_args, classname_args, image_column, label_column, require_labels, check_labels
        )
        heads = load_or_build_heads(
            clip_ref, specs, show_progress=progress_enabled(progress), allow_pickle=allow_pickle
        )
    return [
        ClassificationTask(
            name, loaded[name], ImageClassificationDataset(loaded[name], image_processor), heads[name]
        )
        for name in names
    ]


def _load_tasks(
    tasks: dict[str, str],
    template_args: Mapping[str, str | Sequence[str] | None],
    classname_args: Mapping[str, str | None],
    image_column: str | None,
    label_column: str | None,
    require_labels: bool,
    check_labels: bool,
) -> tuple[dict[str, TaskData], dict[str, tuple[list[str], list[str]]]]:
    """Every task's data, and its class names and templates."""
    loaded, specs = {}, {}
    for name, reference in tasks.items():
        ref = parse_dataset_ref(reference)
        data = load_task_dataset(ref, image_column=image_column, label_column=label_column)
        if require_labels and data.label_column is None:
            raise WEMoEError(
                f"task {name!r}: dataset {data.name} has no label column; name it with --label-column"
            )
        if classname_args[name]:
            names_for_task = load_classnames(classname_args[name])
        elif data.classnames:
            names_for_task = data.classnames
        else:
            raise WEMoEError(
                f"task {name!r}: dataset {data.name} has no ClassLabel column to take class names from; "
                "give them with --classnames FILE"
            )
        if data.classnames and len(names_for_task) != len(data.classnames):
            raise WEMoEError(
                f"task {name!r}: {len(names_for_task)} class names for a dataset with {len(data.classnames)} "
                "classes; the head and the labels must match"
            )
        if check_labels and data.label_column is not None:
            check_label_range(name, data, len(names_for_task))
        task_templates = resolve_task_templates(name, template_args[name], ref.repo or ref.path)
        loaded[name] = data
        specs[name] = (names_for_task, task_templates)
    return loaded, specs


class ZeroShotClassifier(nn.Module):
    """Vision tower -> `visual_projection` -> a task's zero-shot head. Only WEMoE routers can train."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.visual_projection.requires_grad_(False)

    @property
    def is_wemoe(self) -> bool:
        return isinstance(self.vision_model, WEMoECLIPVisionModel)

    def forward(
        self, pixel_values: torch.Tensor, head: ZeroShotHead, output_routing_weights: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits (batch, classes) and, for WEMoE models when asked, the routing weights per MoE layer."""
        if output_routing_weights:
            embeds, routing = self.embed(pixel_values, output_routing_weights=True)
        else:
            embeds, routing = self.embed(pixel_values), None
        return head(embeds.float()), routing

    def check_runs(self, what: str = "the model") -> None:
        """Run one blank image through the vision tower and the projection, so that a model which loads but cannot
        run (corrupted sparse task vectors, a projection of another model) fails in one line before a long run.

        Raises:
            WEMoEError: naming what failed.
        """
        config = self.vision_model.config
        size, channels = int(config.image_size), int(getattr(config, "num_channels", 3))
        parameter = next(self.vision_model.parameters())
        pixels = torch.zeros(1, channels, size, size, dtype=parameter.dtype, device=parameter.device)
        try:
            with torch.no_grad():
                self.embed(pixels)
        except (ValueError, RuntimeError, IndexError) as err:
            raise WEMoEError(f"{what} loads but does not run: {first_line(err)}") from err

    def embed(self, pixel_values: torch.Tensor, output_routing_weights: bool = False):
        """Projected image embeddings (batch, dim); with `output_routing_weights`, `(embeds, routing)`."""
        kwargs = {"output_routing_weights": True} if self.is_wemoe and output_routing_weights else {}
        outputs = self.vision_model(pixel_values=pixel_values, **kwargs)
        embeds = self.visual_projection(outputs.pooler_output.to(self.visual_projection.weight.dtype))
        return (embeds, getattr(outputs, "routing_weights", None)) if output_routing_weights else embeds


def load_image_processor(*refs: str | None) -> Any:
    """The image processor of the first reference that has one (the model itself, then the CLIP model)."""
    from transformers import AutoImageProcessor

    errors = []
    for ref in refs:
        if not ref:
            continue
        location = locate_pretrained(ref, need_weights=False)
        try:
            return AutoImageProcessor.from_pretrained(location.name_or_path, **location.load_kwargs())
        except (OSError, ValueError) as err:
            errors.append(f"{ref}: {first_line(err)}")
    raise SourceError(
        "no image processor (preprocessor_config.json) found in " + "; ".join(errors or ["the given models"])
    )
