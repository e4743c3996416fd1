"""A multi-task merging experiment, end to end: what `hf-wemoe demo` and `scripts/reproduce_ta8.py` run.

Given a pretrained CLIP model, one fine-tuned expert per task and each task's test data, it evaluates the
pretrained model (zero-shot), every expert on its own task, the static merges (average, task arithmetic, TIES),
WEMoE and E-WEMoE after router adaptation, and the oracle-routing bound (the WEMoE model collapsed, for each
task, to that task's own expert MLPs). Merges go through `run_merge` and adaptation through `adapt_routers`,
the same code as `hf-wemoe merge` and `hf-wemoe train`; evaluation uses the same heads and metric as
`hf-wemoe eval`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_wemoe.adaptation import TrainOptions, adapt_routers
from hf_wemoe.evaluation import evaluate_tasks
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.workflows.merge import run_merge
from hf_wemoe.zeroshot.classifier import (
    ClassificationTask,
    ZeroShotClassifier,
    load_image_processor,
    load_vision_model,
    load_visual_projection,
    prepare_tasks,
)

STATIC_METHODS = ("average", "task-arithmetic", "ties")
MOE_METHODS = ("wemoe", "e-wemoe")


@dataclass
class SuiteTask:
    """One task of an experiment: its expert, its test data (also the unlabelled adaptation data) and templates."""

    name: str
    expert: str
    dataset: str
    templates: str | None = None


@dataclass
class Suite:
    """A pretrained CLIP model (with text tower) and its tasks."""

    name: str
    base: str
    tasks: list[SuiteTask]

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]


@dataclass
class ExperimentOptions:
    """What to run and how long to adapt."""

    methods: Sequence[str] = ("pretrained", "individual", *STATIC_METHODS, *MOE_METHODS, "oracle")
    scaling: float = 0.3
    train: TrainOptions = field(default_factory=TrainOptions)
    eval_batch_size: int = 128
    device: str | None = None
    progress: bool = True


@dataclass
class ResultRow:
    """One line of the results table: accuracy (percent) per task for a method and routing mode."""

    method: str
    routing: str | None
    accuracy: dict[str, float]

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "routing": self.routing,
            **{task: round(value, 2) for task, value in self.accuracy.items()},
            "average": round(self.average, 2),
        }


def run_experiment(
    suite: Suite,
    workdir: str | Path,
    options: ExperimentOptions | None = None,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """Merge, adapt and evaluate every method of `options` on `suite`; models are written under `workdir`."""
    options = options or ExperimentOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = load_image_processor(suite.base)
    projection = load_visual_projection(suite.base)
    tasks = prepare_tasks(
        {task.name: task.dataset for task in suite.tasks},
        suite.base,
        processor,
        templates=[f"{task.name}={task.templates}" for task in suite.tasks if task.templates],
        require_labels=True,
    )
    by_name = {task.name: task for task in tasks}
    rows: list[ResultRow] = []

    def evaluate(model: torch.nn.Module, subset: Sequence[ClassificationTask]) -> dict[str, float]:
        classifier = ZeroShotClassifier(model, projection).to(device)
        result = evaluate_tasks(
            classifier, subset, options.eval_batch_size, device, progress=options.progress
        )
        return result.accuracy

    def timed(label: str):
        log(f"[{time.strftime('%H:%M:%S')}] {label}")

    if "pretrained" in options.methods:
        timed("evaluating the pretrained model (zero-shot)")
        vision, _ = load_vision_model(suite.base)
        rows.append(ResultRow("pretrained (zero-shot)", None, evaluate(vision, tasks)))
    if "individual" in options.methods:
        timed("evaluating every expert on its own task")
        accuracy = {}
        for task in suite.tasks:
            vision, _ = load_vision_model(task.expert)
            accuracy.update(evaluate(vision, [by_name[task.name]]))
        rows.append(ResultRow("individual experts", None, accuracy))
    experts = {task.name: task.expert for task in suite.tasks}
    for method in STATIC_METHODS:
        if method not in options.methods:
            continue
        timed(f"merging with {method}")
        output = workdir / method
        merge_options = {"scaling": options.scaling} if method != "average" else {}
        run_merge(
            MergeRecipe(base=suite.base, experts=experts, method=method, **merge_options),
            output,
            overwrite=True,
            show_progress=False,
        )
        vision, _ = load_vision_model(str(output))
        rows.append(ResultRow(method, None, evaluate(vision, tasks)))
    for method in MOE_METHODS:
        if method not in options.methods:
            continue
        timed(f"merging with {method} and adapting its routers ({options.train.steps} steps)")
        merged = workdir / method
        run_merge(
            MergeRecipe(base=suite.base, experts=experts, method=method, scaling=options.scaling),
            merged,
            overwrite=True,
            show_progress=False,
        )
        vision, _ = load_vision_model(str(merged))
        if method == "wemoe" and "oracle" in options.methods:
            timed("evaluating the oracle-routing bound (each task's own expert MLPs)")
            accuracy = {}
            for index, task in enumerate(suite.tasks):
                one_hot = torch.zeros(len(suite.tasks))
                one_hot[index] = 1.0
                accuracy.update(evaluate(vision.collapse(one_hot), [by_name[task.name]]))
            oracle = ResultRow("oracle routing (upper bound)", None, accuracy)
        classifier = ZeroShotClassifier(vision, projection)
        adapt_routers(classifier, tasks, options.train, progress=options.progress)
        vision.save_pretrained(workdir / f"{method}-adapted")
        rows.append(ResultRow(method, vision.config.routing, evaluate(vision, tasks)))
        if method == "wemoe" and "oracle" in options.methods:
            rows.append(oracle)
    return rows


def results_markdown(rows: Sequence[ResultRow], tasks: Sequence[str]) -> str:
    """The results as a markdown table: methods in rows, tasks and the average in columns."""
    header = "| method | routing | " + " | ".join(tasks) + " | average |"
    lines = [header, "|---|---|" + "---:|" * (len(tasks) + 1)]
    for row in rows:
        cells = " | ".join(f"{row.accuracy[t]:.1f}" if t in row.accuracy else "–" for t in tasks)
        lines.append(f"| {row.method} | {row.routing or '–'} | {cells} | {row.average:.1f} |")
    return "\n".join(lines)


def write_results(
    rows: Sequence[ResultRow], tasks: Sequence[str], output: str | Path, preamble: str = ""
) -> None:
    """Write `results.md` (the table) and `results.json` (a list of rows) into `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(
        (preamble + "\n\n" if preamble else "") + results_markdown(rows, tasks) + "\n"
    )
    (output / "results.json").write_text(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")
