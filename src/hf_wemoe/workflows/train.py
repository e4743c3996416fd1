"""The `hf-wemoe train` workflow: adapt the routers of a WEMoE model, evaluate it, write the adapted folder.

The folder is written atomically and holds the model, its image processor, eval_results.json (accuracy per task,
and the model before adaptation as a baseline), routing.png, the merge recipe of a local model folder
(merge_config.yaml, carried over) and a model card. The workflow never pushes: `hf-wemoe
train --push-to-hub` pushes the finished folder afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from hf_wemoe.adaptation import TrainOptions, adapt_routers
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import EvalResult, evaluate_tasks, write_results
from hf_wemoe.hub.cards import MERGE_CONFIG_NAME, write_card
from hf_wemoe.io.layout import EVAL_RESULTS_NAME
from hf_wemoe.io.outputs import atomic_output_dir, check_output_dir
from hf_wemoe.io.sources import parse_reference
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel, is_router_parameter
from hf_wemoe.workflows.plots import plot_routing
from hf_wemoe.workflows.tasks import TaskOptions, load_tasks, require, routing_mode

logger = logging.getLogger(__name__)


class TrainConfig(TaskOptions, TrainOptions):
    """`hf-wemoe train` options (the same fields in a YAML file given with --config)."""

    output: str | None = Field(
        None,
        description="folder for the adapted model",
        json_schema_extra={"metavar": "DIR", "required": True},
    )
    overwrite: bool = Field(False, description="replace an existing output folder")
    evaluate: bool = Field(True, description="evaluate the adapted model on the tasks' labelled data")
    checkpoint_dir: str | None = Field(
        None,
        description="checkpoint folder",
        json_schema_extra={"metavar": "DIR", "default_text": "OUTPUT-checkpoints"},
    )
    resume_from: str | None = Field(
        None,
        description="continue from a checkpoint folder written by --save-every",
        json_schema_extra={"metavar": "DIR"},
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="accelerate trackers to log to (repeatable)",
        json_schema_extra={"metavar": "TRACKER"},
    )
    evaluate_baseline: bool = Field(
        True,
        description="also evaluate the model as it was before adaptation, on the same data with the same heads, "
        "as a baseline in eval_results.json and the model card",
    )


@dataclass
class TrainSummary:
    """What a router adaptation did (on processes other than the main one, only the training fields are set)."""

    steps: int
    final_loss: float
    seconds: float
    processes: int
    is_main_process: bool
    tasks: list[str]
    output: Path | None = None
    """The adapted model folder (main process only)."""
    objective: str = "entropy"
    """How the routers were adapted (`hf_wemoe.adaptation.objective_label`)."""
    monitor: dict | None = None
    """The adaptation monitor's trajectory, collapsed tasks and best probe (None with `monitor_every` 0)."""
    kept_step: int | None = None
    """The step whose routers the model holds (the best one with `keep_best`)."""
    result: EvalResult | None = None
    """Accuracy of the adapted model (None with `evaluate` off or without labelled data)."""
    baseline: EvalResult | None = None
    """Accuracy of the model before adaptation, on the same data with the same heads."""

    def line(self) -> str:
        """A one-line summary for the command line."""
        kept = (
            f", kept the routers of step {self.kept_step}"
            if self.kept_step is not None and self.kept_step != self.steps
            else ""
        )
        collapsed = sorted((self.monitor or {}).get("collapsed", {}))
        warning = f"; collapsing task(s): {', '.join(collapsed)}" if collapsed else ""
        return (
            f"adapted routers for {self.steps} steps on {len(self.tasks)} tasks with {self.objective} "
            f"({self.processes} process(es), {self.seconds:.0f}s, final loss {self.final_loss:.4f}{kept}){warning}"
        )


def run_train(config: TrainConfig, progress: bool = True) -> TrainSummary:
    """Adapt the routers of a WEMoE model and write the adapted model folder (atomically).

    Raises:
        WEMoEError: no output, an existing output without `overwrite`, a static model (no routers), bad tasks or
            data, a non-finite loss.
    """
    output = check_output_dir(require(config.output, "--output"), config.overwrite)
    supervised = config.objective == "supervised"
    classifier, tasks, processor = load_tasks(
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
    options = TrainOptions(**{k: getattr(config, k) for k in TrainOptions.model_fields})
    trained = adapt_routers(
        classifier,
        tasks,
        options,
        checkpoint_dir=checkpoint_dir,
        resume_from=config.resume_from,
        report_to=config.report_to or None,
        run_config=config.model_dump(),
        progress=progress,
    )
    summary = TrainSummary(
        steps=trained["steps"],
        final_loss=trained["final_loss"],
        seconds=trained["seconds"],
        processes=trained["processes"],
        is_main_process=trained["is_main_process"],
        tasks=list(config.task),
        objective=trained["objective"],
        monitor=trained["monitor"],
        kept_step=trained["kept_step"],
    )
    if not summary.is_main_process:
        return summary
    vision: WEMoECLIPVisionModel = classifier.vision_model
    if evaluate:
        summary.result = evaluate_tasks(classifier, labelled, config.eval_batch_size, progress=progress)
    if initial_routers is not None:
        with _routers_swapped(vision, initial_routers):
            summary.baseline = evaluate_tasks(classifier, labelled, config.eval_batch_size, progress=progress)
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        vision.config.provenance = {
            **(vision.config.provenance or {}),
            "adaptation": {
                "tasks": dict(config.task),
                "options": options.model_dump(),
                "objective": summary.objective,
                "steps": summary.steps,
                "kept_step": summary.kept_step,
                "final_loss": summary.final_loss,
            },
        }
        vision.save_pretrained(staging)
        processor.save_pretrained(staging)
        recipe = _merge_recipe_file(config.model)
        if recipe is not None:  # the card shows it and `hf-wemoe merge --config` rebuilds the merge from it
            shutil.copyfile(recipe, staging / MERGE_CONFIG_NAME)
        if summary.result is not None:
            payload = {
                "model": str(output),
                "routing": routing_mode(classifier),
                **summary.result.to_dict(),
                "datasets": {task.name: config.task[task.name] for task in labelled},
            }
            if summary.baseline is not None:
                payload["baselines"] = [{"name": "before adaptation", **summary.baseline.to_dict()}]
            payload["adaptation"] = {
                "objective": summary.objective,
                "steps": summary.steps,
                "kept_step": summary.kept_step,
                "monitor": summary.monitor,
            }
            write_results(staging / EVAL_RESULTS_NAME, payload)
            plot_routing(
                summary.result.routing,
                list(vision.config.expert_names),
                staging / "routing.png",
                layers=vision.config.moe_layer_indices,
                trajectory=(summary.monitor or {}).get("trajectory"),
            )
        try:
            write_card(staging, model_id=output.name)
        except WEMoEError as err:  # the adapted model matters more than its card
            logger.warning("no model card written for %s: %s", output, err)
    summary.output = output
    return summary


def _merge_recipe_file(model_ref: str | None) -> Path | None:
    """The merge_config.yaml of a local model folder, if it has one (Hub models: the card uses the recipe
    recorded in config.json)."""
    try:
        reference = parse_reference(str(model_ref))
    except WEMoEError:
        return None
    path = reference.path / MERGE_CONFIG_NAME if reference.is_local else None
    return path if path is not None and path.is_file() else None


def _router_state(model: WEMoECLIPVisionModel) -> dict:
    """A copy of the router parameters (what adaptation changes)."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if is_router_parameter(name)
    }


@contextlib.contextmanager
def _routers_swapped(model: WEMoECLIPVisionModel, routers: dict) -> Iterator[None]:
    """Run with other router parameters in place, then put the current ones back."""
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


__all__ = ["TrainConfig", "TrainSummary", "run_train"]
