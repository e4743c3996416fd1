"""The `hf-wemoe calibrate` workflow, and calibration at merge time (`hf-wemoe merge --calibrate`).

`run_calibrate` sets the routers of an existing WEMoE model from a few unlabelled images per task
(`hf_wemoe.calibration`), evaluates it before and after on the tasks' labelled data, and writes the calibrated
folder like `hf-wemoe train` does (`workflows/adapted.py`). At merge time, `calibrate_merged_folder` calibrates the
merged model in the merge's staging folder and writes its router tensors back into the safetensors files in
place (every other tensor keeps its bytes), before the folder is renamed into place: a failure leaves nothing.
Both record what was done under `provenance.calibration` in config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from hf_wemoe.adaptation import router_state
from hf_wemoe.calibration import (
    DEFAULT_RIDGE,
    MAX_IMAGES_PER_TASK,
    CalibrationSummary,
    calibrate_routers,
)
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import EvalResult
from hf_wemoe.io.layout import CONFIG_NAME
from hf_wemoe.io.outputs import check_output_dir
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel, is_router_parameter
from hf_wemoe.workflows.adapted import evaluate_with_baseline, write_adapted_folder
from hf_wemoe.workflows.evaluate import default_device
from hf_wemoe.workflows.tasks import TaskOptions, load_tasks, require, routing_mode
from hf_wemoe.zeroshot.classifier import load_image_processor, load_vision_model
from hf_wemoe.zeroshot.data import ImageClassificationDataset, TaskData, load_task_dataset


class CalibrateConfig(TaskOptions):
    """`hf-wemoe calibrate` options (the same fields in a YAML file given with --config)."""

    output: str | None = Field(
        None,
        description="folder for the calibrated model",
        json_schema_extra={"metavar": "DIR", "required": True},
    )
    overwrite: bool = Field(False, description="replace an existing output folder")
    calibration_images: int = Field(
        MAX_IMAGES_PER_TASK,
        ge=1,
        le=MAX_IMAGES_PER_TASK,
        description="unlabelled calibration images per task, picked by a seeded permutation of its dataset",
    )
    seed: int = Field(0, description="seed of the choice of calibration images")
    ridge: float = Field(
        DEFAULT_RIDGE,
        gt=0,
        allow_inf_nan=False,
        description="ridge strength of the router fit, relative to the features' mean eigenvalue",
    )
    evaluate: bool = Field(True, description="evaluate the calibrated model on the tasks' labelled data")
    evaluate_baseline: bool = Field(
        True,
        description="also evaluate the model as it was before calibration, on the same data with the same heads, "
        "as a baseline in eval_results.json and the model card",
    )


@dataclass
class CalibrateSummary:
    """What `run_calibrate` did and wrote."""

    calibration: CalibrationSummary
    output: Path
    result: EvalResult | None = None
    """Accuracy of the calibrated model (None with `evaluate` off or without labelled data)."""
    baseline: EvalResult | None = None
    """Accuracy of the model before calibration, on the same data with the same heads."""

    def line(self) -> str:
        """A one-line summary for the command line."""
        return self.calibration.line()


@dataclass(frozen=True)
class CalibrationRequest:
    """A calibration to run on a freshly merged model (`hf-wemoe merge --calibrate NAME=DATASET`)."""

    datasets: dict[str, str]
    """Task name (the expert its images route to) -> dataset reference."""
    images_per_task: int = MAX_IMAGES_PER_TASK
    seed: int = 0
    ridge: float = DEFAULT_RIDGE

    def record(self) -> dict[str, Any]:
        """What `provenance.calibration` records."""
        return calibration_record(self.datasets, self.images_per_task, self.seed, self.ridge)


def calibration_record(
    datasets: Mapping[str, str], images_per_task: int, seed: int, ridge: float
) -> dict[str, Any]:
    """What `provenance.calibration` in config.json records: enough to calibrate the same way again."""
    return {"tasks": dict(datasets), "images_per_task": images_per_task, "seed": seed, "ridge": ridge}


def run_calibrate(config: CalibrateConfig, progress: bool | None = True) -> CalibrateSummary:
    """Calibrate the routers of a WEMoE model and write the calibrated model folder (atomically).

    Calibration runs on `device` (cuda when available) in chunks of `eval_batch_size` images.

    Raises:
        WEMoEError: no output, an existing output without `overwrite`, a static model, a depth-0 router, a task
            that names no expert, bad tasks or data.
    """
    output = check_output_dir(require(config.output, "--output"), config.overwrite)
    classifier, tasks, processor = load_tasks(config, require_labels=False, check_labels=config.evaluate)
    vision = classifier.vision_model
    if not classifier.is_wemoe:
        raise WEMoEError(
            f"{config.model} is a static CLIP vision model with no routers to calibrate; merge it with "
            "`hf-wemoe merge --method wemoe` (or e-wemoe) first"
        )
    classifier.to(config.device or default_device())
    labelled = [t for t in tasks if t.data.label_column is not None]
    evaluate = config.evaluate and bool(labelled)
    initial_routers = router_state(vision) if evaluate and config.evaluate_baseline else None
    calibration = calibrate_routers(
        vision,
        tasks,
        images_per_task=config.calibration_images,
        seed=config.seed,
        ridge=config.ridge,
        batch_size=config.eval_batch_size,
        progress=progress,
    )
    summary = CalibrateSummary(calibration=calibration, output=output)
    if evaluate:
        summary.result, summary.baseline = evaluate_with_baseline(
            classifier, labelled, initial_routers, config.eval_batch_size, progress
        )
    vision.config.provenance = {
        **(vision.config.provenance or {}),
        "calibration": calibration_record(config.task, config.calibration_images, config.seed, config.ridge),
    }
    write_adapted_folder(
        output,
        vision,
        processor,
        model_ref=config.model,
        overwrite=config.overwrite,
        routing=routing_mode(classifier),
        datasets={task.name: config.task[task.name] for task in labelled},
        result=summary.result,
        baseline=summary.baseline,
        baseline_name="before calibration",
    )
    return summary


def load_calibration_data(datasets: Mapping[str, str]) -> dict[str, TaskData]:
    """Every calibration task's data (read before a long merge, so that a bad reference fails at once).

    Raises:
        SourceError: a dataset that cannot be found or read (one line).
    """
    return {name: load_task_dataset(reference) for name, reference in datasets.items()}


@dataclass
class _UnlabelledTask:
    name: str
    dataset: ImageClassificationDataset


def calibrate_merged_folder(
    folder: Path,
    request: CalibrationRequest,
    data: Mapping[str, TaskData],
    *,
    processor_refs: tuple[str, ...] = (),
    progress: bool | None = None,
) -> CalibrationSummary:
    """Calibrate the WEMoE model saved in `folder` (a merge's staging folder) on `data` (from
    `load_calibration_data`) and write its routers back.

    Only the router tensors of the safetensors files change; `provenance.calibration` is added to config.json.
    The image processor comes from the folder, else from the first of `processor_refs` that has one.
    """
    vision, _ = load_vision_model(str(folder))
    if not isinstance(vision, WEMoECLIPVisionModel):
        raise WEMoEError(f"{folder} holds no WEMoE model to calibrate")
    processor = load_image_processor(str(folder), *processor_refs)
    tasks = [
        _UnlabelledTask(name, ImageClassificationDataset(task_data, processor, with_labels=False))
        for name, task_data in data.items()
    ]
    vision.to(default_device())
    summary = calibrate_routers(
        vision,
        tasks,
        images_per_task=request.images_per_task,
        seed=request.seed,
        ridge=request.ridge,
        progress=progress,
    )
    write_routers(folder, vision)
    _record_in_config(folder / CONFIG_NAME, request.record())
    return summary


def write_routers(folder: Path, vision: WEMoECLIPVisionModel) -> None:
    """Replace the router tensors in the safetensors files of `folder` with those of `vision`.

    Files are rewritten beside themselves and renamed over the old ones: the loaded model may still map the old
    files, which must not change under it. A full CLIP folder stores the vision tower under `vision_model.`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    routers = {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in vision.named_parameters()
        if is_router_parameter(name)
    }
    written = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            keys = [key for key in handle.keys() if is_router_parameter(key)]  # noqa: SIM118 (not a dict)
        if not keys:
            continue
        tensors = load_file(str(path))
        for key in keys:
            name = key.removeprefix("vision_model.")
            if name not in routers:
                raise WEMoEError(f"{path.name} holds a router tensor '{key}' the model does not have")
            tensors[key] = routers[name].to(tensors[key].dtype)
            written.add(name)
        fresh = path.with_name(f".{path.name}.calibrated")
        save_file(tensors, str(fresh), metadata=metadata)
        os.replace(fresh, path)
    missing = sorted(set(routers) - written)
    if missing:
        raise WEMoEError(f"no router tensor '{missing[0]}' in the safetensors files of {folder}")


def _record_in_config(path: Path, record: dict[str, Any]) -> None:
    """Add `record` as `provenance.calibration` of a saved config (a full CLIP keeps it in `vision_config`)."""
    config = json.loads(path.read_text())
    holder = config["vision_config"] if isinstance(config.get("vision_config"), dict) else config
    holder["provenance"] = {**(holder.get("provenance") or {}), "calibration": record}
    # The layout save_pretrained writes.
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "CalibrateConfig",
    "CalibrateSummary",
    "CalibrationRequest",
    "calibrate_merged_folder",
    "calibration_record",
    "load_calibration_data",
    "run_calibrate",
    "write_routers",
]
