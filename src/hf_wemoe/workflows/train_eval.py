"""The `hf-wemoe train` and `hf-wemoe eval` workflows: load, adapt, evaluate, write outputs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.adaptation import TrainOptions, adapt_routers
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import EvalResult, evaluate_tasks, markdown_table, write_results
from hf_wemoe.hub.cards import write_card
from hf_wemoe.io.outputs import atomic_output_dir, check_output_dir, check_output_file
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.workflows.plots import plot_routing
from hf_wemoe.zeroshot.classifier import (
    ZeroShotClassifier,
    check_projection,
    default_clip_ref,
    load_image_processor,
    load_vision_model,
    load_visual_projection,
    prepare_tasks,
)

logger = logging.getLogger(__name__)


class TaskOptions(BaseModel):
    """What both train and eval need: the model, the tasks and how to build their zero-shot heads."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model: a local folder or a Hub id[@revision]")
    task: dict[str, str] = Field(default_factory=dict, description="a task as NAME=DATASET (repeatable)")
    clip_model: str | None = Field(
        None, description="CLIP model whose text tower gives the zero-shot heads (default: the recorded base)"
    )
    templates: list[str] = Field(
        default_factory=list,
        description="prompt templates: a set name or a file, for all tasks or as TASK=...",
    )
    classnames: list[str] = Field(
        default_factory=list,
        description="class-names file, for all tasks or as TASK=FILE (default: ClassLabel)",
    )
    image_column: str | None = Field(None, description="image column (default: detected)")
    label_column: str | None = Field(None, description="label column (default: detected)")
    allow_pickle: bool = Field(
        False,
        description="accept models that only have pickle weights (pytorch_model.bin); unpickling files from "
        "untrusted sources can execute arbitrary code, they are loaded with torch.load(weights_only=True)",
    )
    eval_batch_size: int = Field(128, ge=1, description="batch size for evaluation")
    device: str | None = Field(None, description="device for evaluation (default: cuda when available)")


class EvalConfig(TaskOptions):
    """`hf-wemoe eval` options."""

    routing: Literal["sample", "batch"] | None = Field(
        None, description="routing mode (default: the model's)"
    )
    output_json: str = Field("eval_results.json", description="where to write the results as JSON")


class TrainConfig(TaskOptions, TrainOptions):
    """`hf-wemoe train` options (the same fields in a YAML file given with --config)."""

    output: str | None = Field(None, description="folder for the adapted model")
    overwrite: bool = Field(False, description="replace an existing output folder")
    evaluate: bool = Field(True, description="evaluate the adapted model on the tasks' labelled data")
    checkpoint_dir: str | None = Field(None, description="checkpoint folder (default: OUTPUT-checkpoints)")
    resume_from: str | None = Field(
        None, description="continue from a checkpoint folder written by --save-every"
    )
    report_to: list[str] = Field(
        default_factory=list, description="accelerate trackers to log to (repeatable)"
    )
    evaluate_baseline: bool = Field(
        True,
        description="also evaluate the model as it was before adaptation, on the same data with the same heads, "
        "as a baseline in eval_results.json and the model card",
    )
    push_to_hub: str | None = Field(
        None, description="push the adapted model folder to this Hub repo (ORG/NAME) with its model card"
    )
    private: bool = Field(False, description="create the --push-to-hub repo as private")


def _require(value, flag: str):
    if not value:
        raise WEMoEError(f"{flag} is required")
    return value


def _load(config: TaskOptions, require_labels: bool, check_labels: bool | None = None):
    model_ref = _require(config.model, "--model")
    tasks_spec = _require(config.task, "--task NAME=DATASET")
    vision, projection = load_vision_model(model_ref, allow_pickle=config.allow_pickle)
    clip_ref = default_clip_ref(vision, model_ref, config.clip_model)
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


def run_eval(config: EvalConfig, progress: bool = True) -> EvalResult:
    """Evaluate a WEMoE or plain CLIP vision model; prints nothing, returns the result and writes the JSON."""
    check_output_file(config.output_json, "--output-json")  # before the evaluation, not after it
    classifier, tasks, _ = _load(config, require_labels=True)
    if config.routing and isinstance(classifier.vision_model, WEMoECLIPVisionModel):
        classifier.vision_model.config.routing = config.routing
    device = config.device or _default_device()
    classifier.to(device)
    classifier.check_runs(f"the model {config.model}")
    result = evaluate_tasks(classifier, tasks, config.eval_batch_size, device, progress=progress)
    payload = {
        "model": config.model,
        "routing": _routing(classifier),
        **result.to_dict(),
        "datasets": {task.name: config.task[task.name] for task in tasks},
    }
    write_results(config.output_json, payload)
    return result


def run_train(config: TrainConfig, progress: bool = True) -> dict:
    """Adapt the routers of a WEMoE model and write the adapted model folder (atomically).

    The folder gets the model, its image processor, eval_results.json (accuracy per task, and the model before
    adaptation as a baseline), routing.png and a model card; with `push_to_hub` it is then pushed to the Hub
    (`summary["push"]` holds the `PushResult`).
    """
    output = check_output_dir(_require(config.output, "--output"), config.overwrite)
    if config.push_to_hub:
        from hf_wemoe.hub.push import check_repo_id, check_token

        check_repo_id(config.push_to_hub)
        check_token()
    supervised = config.objective == "supervised"
    classifier, tasks, processor = _load(
        config, require_labels=supervised, check_labels=supervised or config.evaluate
    )
    if not classifier.is_wemoe:
        raise WEMoEError(
            f"{config.model} is a static CLIP vision model with no routers to adapt; merge it with "
            "`hf-wemoe merge --method wemoe` (or e-wemoe) first"
        )
    labelled = [t for t in tasks if t.data.label_column is not None]
    evaluate = config.evaluate and bool(labelled)
    # The routers before adaptation (small): the baseline is evaluated with them after training.
    initial_routers = (
        _router_state(classifier.vision_model) if evaluate and config.evaluate_baseline else None
    )
    checkpoint_dir = config.checkpoint_dir or f"{output}-checkpoints"
    summary = adapt_routers(
        classifier,
        tasks,
        TrainOptions(**{k: getattr(config, k) for k in TrainOptions.model_fields}),
        checkpoint_dir=checkpoint_dir,
        resume_from=config.resume_from,
        report_to=config.report_to or None,
        run_config=config.model_dump(),
        progress=progress,
    )
    if not summary["is_main_process"]:
        return summary
    vision: WEMoECLIPVisionModel = classifier.vision_model
    result = baseline = None
    if evaluate:
        result = evaluate_tasks(classifier, labelled, config.eval_batch_size, progress=progress)
    if initial_routers is not None:
        with _routers_swapped(vision, initial_routers):
            baseline = evaluate_tasks(classifier, labelled, config.eval_batch_size, progress=progress)
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        vision.config.provenance = {
            **(vision.config.provenance or {}),
            "adaptation": {
                "tasks": dict(config.task),
                "options": TrainOptions(
                    **{k: getattr(config, k) for k in TrainOptions.model_fields}
                ).model_dump(),
                "steps": summary["steps"],
                "final_loss": summary["final_loss"],
            },
        }
        vision.save_pretrained(staging)
        processor.save_pretrained(staging)
        if result is not None:
            payload = {
                "model": str(output),
                "routing": _routing(classifier),
                **result.to_dict(),
                "datasets": {task.name: config.task[task.name] for task in labelled},
            }
            if baseline is not None:
                payload["baselines"] = [{"name": "before adaptation", **baseline.to_dict()}]
            write_results(staging / "eval_results.json", payload)
            plot_routing(
                result.routing,
                list(vision.config.expert_names),
                staging / "routing.png",
                layers=vision.config.moe_layer_indices,
            )
        try:
            write_card(staging, model_id=output.name)
        except WEMoEError as err:  # the adapted model matters more than its card
            logger.warning("no model card written for %s: %s", output, err)
    summary["output"] = str(output)
    summary["result"] = result
    summary["baseline"] = baseline
    summary["push"] = None
    if config.push_to_hub:
        from hf_wemoe.hub.push import push_folder

        try:
            summary["push"] = push_folder(
                output, config.push_to_hub, private=config.private, show_progress=None if progress else False
            )
        except WEMoEError as err:
            raise WEMoEError(
                f"saved the adapted model to {output}, but the push failed: {err} (retry with: hf-wemoe push "
                f"{output} --repo-id {config.push_to_hub})"
            ) from err
    return summary


def _router_state(model: WEMoECLIPVisionModel) -> dict:
    """A copy of the router parameters (what adaptation changes)."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if ".router." in f".{name}"
    }


@contextlib.contextmanager
def _routers_swapped(model: WEMoECLIPVisionModel, routers: dict) -> Iterator[None]:
    """Run with other router parameters in place, then put the current ones back."""
    import torch

    parameters = dict(model.named_parameters())
    current = {name: parameters[name].detach().clone() for name in routers}
    with torch.no_grad():
        for name, value in routers.items():
            parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in current.items():
                parameters[name].copy_(value)


def format_results(result: EvalResult, name: str) -> str:
    """The markdown accuracy table of one model."""
    return markdown_table([(name, result.accuracy)], list(result.accuracy))


def _routing(classifier: ZeroShotClassifier) -> str | None:
    return classifier.vision_model.config.routing if classifier.is_wemoe else None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["EvalConfig", "TrainConfig", "format_results", "run_eval", "run_train"]
