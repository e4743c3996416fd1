"""The `hf-wemoe eval` workflow: load a model and its tasks, measure top-1 accuracy, write it as JSON."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hf_wemoe.evaluation import (
    EvalResult,
    evaluate_mixed_stream,
    evaluate_tasks,
    markdown_table,
    write_results,
)
from hf_wemoe.io.outputs import check_output_file
from hf_wemoe.models.configuration_wemoe import RoutingMode
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.workflows.tasks import TaskOptions, load_tasks, routing_mode


class EvalConfig(TaskOptions):
    """`hf-wemoe eval` options (the same fields in a YAML file given with --config)."""

    routing: RoutingMode | None = Field(
        None, description="routing mode", json_schema_extra={"default_text": "the model's"}
    )
    output_json: str = Field("eval_results.json", description="where to write the results as JSON")
    stream: Literal["tasks", "mixed"] = Field(
        "tasks",
        description="tasks: each task's images in batches of their own; mixed: all tasks as one shuffled stream "
        "(every batch mixes tasks, each image scored with its own task's head: what a deployed model sees, "
        "and where batch routing averages the routing of different tasks)",
    )
    seed: int = Field(0, description="seed of the mixed stream's order")


def run_eval(config: EvalConfig, progress: bool = True) -> EvalResult:
    """Evaluate a WEMoE or plain CLIP vision model; prints nothing, returns the result and writes the JSON."""
    check_output_file(config.output_json, "--output-json")  # before the evaluation, not after it
    classifier, tasks, _ = load_tasks(config, require_labels=True)
    if config.routing and isinstance(classifier.vision_model, WEMoECLIPVisionModel):
        classifier.vision_model.set_routing(config.routing)
    device = config.device or default_device()
    classifier.to(device)
    classifier.check_runs(f"the model {config.model}")
    if config.stream == "mixed":
        result = evaluate_mixed_stream(
            classifier, tasks, config.eval_batch_size, seed=config.seed, device=device, progress=progress
        )
    else:
        result = evaluate_tasks(classifier, tasks, config.eval_batch_size, device, progress=progress)
    payload = {
        "model": config.model,
        "routing": routing_mode(classifier),
        "stream": "tasks" if config.stream == "tasks" else f"mixed, batch {config.eval_batch_size}",
        **result.to_dict(),
        "datasets": {task.name: config.task[task.name] for task in tasks},
    }
    write_results(config.output_json, payload)
    return result


def format_results(result: EvalResult, name: str) -> str:
    """The markdown accuracy table of one model."""
    return markdown_table([(name, result.accuracy)], list(result.accuracy))


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["EvalConfig", "EvalResult", "default_device", "format_results", "run_eval"]
