"""What `hf-wemoe train` and `hf-wemoe eval` share: the model, its tasks, and loading both."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hf_wemoe.errors import WEMoEError
from hf_wemoe.zeroshot.classifier import (
    ClassificationTask,
    ZeroShotClassifier,
    check_projection,
    default_clip_ref,
    load_image_processor,
    load_vision_model,
    load_visual_projection,
    parse_named,
    prepare_tasks,
)


class TaskOptions(BaseModel):
    """What both train and eval need: the model, the tasks and how to build their zero-shot heads."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model: a local folder or a Hub id[@revision]",
        json_schema_extra={"metavar": "REF", "required": True},
    )
    task: dict[str, str] = Field(
        default_factory=dict,
        description="a task as NAME=DATASET (repeatable)",
        json_schema_extra={"metavar": "NAME=DATASET", "required": True},
    )
    clip_model: str | None = Field(
        None,
        description="CLIP model whose text tower gives the zero-shot heads; a full CLIP model that records no "
        "base uses its own",
        json_schema_extra={"metavar": "REF", "default_text": "the recorded base"},
    )
    templates: list[str] = Field(
        default_factory=list,
        description="prompt templates: a set name or a file, for all tasks or as TASK=...",
    )
    classnames: list[str] = Field(
        default_factory=list,
        description="class-names file, for all tasks or as TASK=FILE",
        json_schema_extra={"default_text": "the dataset's ClassLabel"},
    )
    image_column: str | None = Field(
        None, description="image column", json_schema_extra={"default_text": "detected"}
    )
    label_column: str | None = Field(
        None, description="label column", json_schema_extra={"default_text": "detected"}
    )
    allow_pickle: bool = Field(
        False,
        description="accept models that only have pickle weights (pytorch_model.bin); unpickling files from "
        "untrusted sources can execute arbitrary code, they are loaded with torch.load(weights_only=True)",
    )
    eval_batch_size: int = Field(128, ge=1, description="batch size for evaluation")
    device: str | None = Field(
        None, description="device for evaluation", json_schema_extra={"default_text": "cuda when available"}
    )

    @field_validator("task", mode="before")
    @classmethod
    def _tasks_from_list(cls, value: Any) -> Any:
        # Flags (and YAML files) may list tasks as NAME=DATASET strings.
        if isinstance(value, (list, tuple)):
            try:
                return parse_named([str(item) for item in value], "--task")
            except WEMoEError as err:
                raise ValueError(str(err)) from None
        return value


def require(value: Any, flag: str) -> Any:
    """`value`, or a `WEMoEError` saying that `flag` is required."""
    if not value:
        raise WEMoEError(f"{flag} is required")
    return value


def load_tasks(
    config: TaskOptions, require_labels: bool, check_labels: bool | None = None
) -> tuple[ZeroShotClassifier, list[ClassificationTask], Any]:
    """The classifier (vision model and projection), the tasks with their zero-shot heads, and the image
    processor of `config`; every task's head must have one class per dataset label (and with `check_labels`,
    default `require_labels`, every label must be one of the head's classes)."""
    model_ref = require(config.model, "--model")
    tasks_spec = require(config.task, "--task NAME=DATASET")
    vision, projection = load_vision_model(model_ref, allow_pickle=config.allow_pickle)
    # A full CLIP checkpoint comes with its projection and its text tower: it gives its own zero-shot heads.
    clip_ref = default_clip_ref(vision, model_ref, config.clip_model, has_text_tower=projection is not None)
    if projection is None:
        projection = load_visual_projection(clip_ref, allow_pickle=config.allow_pickle)
    check_projection(vision, projection, model_ref, clip_ref)
    processor = load_image_processor(model_ref, clip_ref)
    tasks = prepare_tasks(
        tasks_spec,
        clip_ref,
        processor,
        templates=config.templates,
        classnames=config.classnames,
        image_column=config.image_column,
        label_column=config.label_column,
        require_labels=require_labels,
        check_labels=check_labels,
        allow_pickle=config.allow_pickle,
    )
    for task in tasks:
        labels = task.data.classnames
        if labels is not None and len(labels) != task.head.num_classes:
            raise WEMoEError(
                f"task {task.name!r}: the head has {task.head.num_classes} classes, the dataset {len(labels)}"
            )
    return ZeroShotClassifier(vision, projection), tasks, processor


def routing_mode(classifier: ZeroShotClassifier) -> str | None:
    """The routing mode of a WEMoE classifier, None for a static model."""
    return classifier.vision_model.config.routing if classifier.is_wemoe else None


__all__ = ["TaskOptions", "load_tasks", "require", "routing_mode"]
