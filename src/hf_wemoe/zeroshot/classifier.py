"""Zero-shot image classification with a (WEMoE or plain) CLIP vision tower: what train and eval share.

A task is a name, a dataset split, class names and prompt templates; its classifier head comes from the
pretrained CLIP text tower. The vision side is any CLIP vision tower plus the base model's `visual_projection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.io.sources import parse_reference
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.zeroshot.data import ImageClassificationDataset, TaskData, load_task_dataset, parse_dataset_ref
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


def load_vision_model(ref: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Linear | None]:
    """Load a vision tower: a WEMoE model, a `CLIPVisionModel`, or a full `CLIPModel` (its vision tower).

    Returns `(vision_model, visual_projection)`; the projection is None unless the checkpoint has one.
    """
    from transformers import AutoConfig, AutoModel, CLIPModel, CLIPVisionModel

    repo, revision = split_model_ref(ref)
    try:
        config = AutoConfig.from_pretrained(repo, revision=revision)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot load model {ref}: {_first_line(err)}") from err
    kwargs = {"revision": revision, **({"dtype": dtype} if dtype is not None else {})}
    try:
        if config.model_type == "clip":
            clip = CLIPModel.from_pretrained(repo, **kwargs)
            return clip.vision_model, clip.visual_projection
        if config.model_type == "wemoe_clip":  # a full CLIP with a WEMoE vision tower
            clip = AutoModel.from_pretrained(repo, **kwargs)
            return clip.vision_model, clip.visual_projection
        if config.model_type == "clip_vision_model":
            return CLIPVisionModel.from_pretrained(repo, **kwargs), None
        model = AutoModel.from_pretrained(repo, **kwargs)
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot load model {ref}: {_first_line(err)}") from err
    if not isinstance(model, WEMoECLIPVisionModel):
        raise WEMoEError(f"{ref} is a {type(model).__name__}; expected a CLIP vision tower or a WEMoE model")
    return model, None


def load_visual_projection(clip_ref: str) -> nn.Linear:
    """The `visual_projection` of a full CLIP model (the base the experts were fine-tuned from)."""
    from transformers import CLIPModel

    repo, revision = split_model_ref(clip_ref)
    try:
        clip = CLIPModel.from_pretrained(repo, revision=revision)
    except (OSError, ValueError) as err:
        raise SourceError(
            f"cannot load the CLIP model {clip_ref} (its text tower and visual projection give the zero-shot "
            f"heads): {_first_line(err)}; name it with --clip-model"
        ) from err
    return clip.visual_projection


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
    templates: str | Sequence[str] | None = None,
    classnames: str | Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
) -> list[ClassificationTask]:
    """Load every task's data and build (or fetch from the cache) its zero-shot head."""
    names = list(tasks)
    template_args = per_task_option(templates, names, "--templates")
    classname_args = per_task_option(classnames, names, "--classnames")
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
        task_templates = resolve_task_templates(name, template_args[name], ref.repo or ref.path)
        loaded[name] = data
        specs[name] = (names_for_task, task_templates)
    heads = load_or_build_heads(clip_ref, specs, show_progress=False)
    return [
        ClassificationTask(
            name, loaded[name], ImageClassificationDataset(loaded[name], image_processor), heads[name]
        )
        for name in names
    ]


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
        repo, revision = split_model_ref(ref)
        try:
            return AutoImageProcessor.from_pretrained(repo, revision=revision)
        except (OSError, ValueError) as err:
            errors.append(f"{ref}: {_first_line(err)}")
    raise SourceError(
        "no image processor (preprocessor_config.json) found in " + "; ".join(errors or ["the given models"])
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
