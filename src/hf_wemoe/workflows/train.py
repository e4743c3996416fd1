"""The `hf-wemoe train` workflow: adapt the routers of a WEMoE model, evaluate it, write the adapted folder.

The folder is written atomically and holds the model, its image processor, eval_results.json (accuracy per task,
and the model before adaptation as a baseline), routing.png, the merge recipe of a local model folder
(merge_config.yaml, carried over) and a model card. The workflow never pushes: `hf-wemoe
train --push-to-hub` pushes the finished folder afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from hf_wemoe.adaptation import TrainOptions, adapt_routers, router_state
from hf_wemoe.calibration import DEFAULT_RIDGE, MAX_IMAGES_PER_TASK, calibrate_routers
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import EvalResult
from hf_wemoe.io.outputs import check_output_dir
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.workflows.adapted import evaluate_with_baseline, write_adapted_folder
from hf_wemoe.workflows.calibrate import calibration_record
from hf_wemoe.workflows.tasks import TaskOptions, load_tasks, require, routing_mode


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
    calibrate: bool = Field(
        False,
        description="calibrate the routers first (no gradient step: each task's images routed to the expert of "
        "the same name, from --calibration-images unlabelled images per task), then adapt from there",
    )
    calibration_images: int = Field(
        MAX_IMAGES_PER_TASK, ge=1, le=MAX_IMAGES_PER_TASK, description="unlabelled images per task for --calibrate"
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
        router_state(classifier.vision_model) if evaluate and config.evaluate_baseline else None
    )
    calibration = None
    if config.calibrate:  # a resumed run then takes its routers from the checkpoint
        calibrate_routers(
            classifier.vision_model, tasks, config.calibration_images, seed=config.seed, progress=progress
        )
        calibration = calibration_record(config.task, config.calibration_images, config.seed, DEFAULT_RIDGE)
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
        summary.result, summary.baseline = evaluate_with_baseline(
            classifier, labelled, initial_routers, config.eval_batch_size, progress
        )
    # What ran, in config.json (with tasks, options and loss) and in eval_results.json (with the monitor).
    ran = {"objective": summary.objective, "steps": summary.steps, "kept_step": summary.kept_step}
    vision.config.provenance = {
        **(vision.config.provenance or {}),
        **({"calibration": calibration} if calibration is not None else {}),
        "adaptation": {
            "tasks": dict(config.task),
            "options": options.model_dump(),
            **ran,
            "final_loss": summary.final_loss,
        },
    }
    summary.output = write_adapted_folder(
        output,
        vision,
        processor,
        model_ref=config.model,
        overwrite=config.overwrite,
        routing=routing_mode(classifier),
        datasets={task.name: config.task[task.name] for task in labelled},
        result=summary.result,
        baseline=summary.baseline,
        baseline_name="before adaptation",
        details={"adaptation": {**ran, "monitor": summary.monitor}},
        trajectory=(summary.monitor or {}).get("trajectory"),
    )
    return summary


__all__ = ["TrainConfig", "TrainSummary", "run_train"]
