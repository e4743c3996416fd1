"""A multi-task merging experiment, end to end: what `hf-wemoe demo` and `scripts/reproduce_ta8.py` run.

Given a pretrained CLIP model, one fine-tuned expert per task and each task's test data, it evaluates the
pretrained model (zero-shot), every expert on its own task, the static merges (average, task arithmetic, TIES),
WEMoE and E-WEMoE after router adaptation, and the oracle-routing bound (the WEMoE model collapsed, for each
task, to that task's own expert MLPs). Merges go through `run_merge` and adaptation through `adapt_routers`,
the same code as `hf-wemoe merge` and `hf-wemoe train`; evaluation uses the same heads and metric as
`hf-wemoe eval`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_wemoe.adaptation import TrainOptions, adapt_routers
from hf_wemoe.evaluation import evaluate_tasks, write_results
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.merging.registry import get_method
from hf_wemoe.utils.progress import quiet_libraries
from hf_wemoe.workflows.merge import run_merge
from hf_wemoe.workflows.suites import Suite, SuiteTask
from hf_wemoe.zeroshot.classifier import (
    ClassificationTask,
    ZeroShotClassifier,
    load_image_processor,
    load_vision_model,
    load_visual_projection,
    prepare_tasks,
)

# Rows that are not merges: the pretrained model, each expert on its own task, and the oracle-routing bound
# (computed from the first MoE merge with dense task vectors, shown after it).
PRETRAINED, INDIVIDUAL, ORACLE = "pretrained", "individual", "oracle"
DEFAULT_METHODS = (PRETRAINED, INDIVIDUAL, "average", "task-arithmetic", "ties", "wemoe", "e-wemoe", ORACLE)


@dataclass
class ExperimentOptions:
    """What to run and how long to adapt.

    `methods` lists the rows in order: merge method names (any registered method: static ones are evaluated as
    merged, MoE ones after router adaptation) and `pretrained`, `individual` and `oracle`.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    scaling: float = 0.3
    train: TrainOptions = field(default_factory=TrainOptions)
    eval_batch_size: int = 128
    device: str | None = None
    progress: bool | None = None
    """Progress of evaluation, adaptation and downloads: None follows the package's policy, False shows none."""


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
    methods = {name: get_method(name) for name in options.methods if name not in (PRETRAINED, INDIVIDUAL, ORACLE)}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries(options.progress):
        return _run(suite, workdir, options, methods, log)


def _run(suite: Suite, workdir: Path, options: ExperimentOptions, methods: dict, log) -> list[ResultRow]:
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = load_image_processor(suite.base)
    projection = load_visual_projection(suite.base)
    tasks = prepare_tasks(
        {task.name: task.dataset for task in suite.tasks},
        suite.base,
        processor,
        templates={task.name: task.templates for task in suite.tasks if task.templates is not None},
        require_labels=True,
        progress=options.progress,
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

    if PRETRAINED in options.methods:
        timed("evaluating the pretrained model (zero-shot)")
        vision, _ = load_vision_model(suite.base)
        rows.append(ResultRow("pretrained (zero-shot)", None, evaluate(vision, tasks)))
    if INDIVIDUAL in options.methods:
        timed("evaluating every expert on its own task")
        accuracy = {}
        for task in suite.tasks:
            vision, _ = load_vision_model(task.expert)
            accuracy.update(evaluate(vision, [by_name[task.name]]))
        rows.append(ResultRow("individual experts", None, accuracy))
    experts = {task.name: task.expert for task in suite.tasks}
    oracle_wanted = ORACLE in options.methods
    for name, method in methods.items():
        what = f" and adapting its routers ({options.train.steps} steps)" if method.is_moe else ""
        timed(f"merging with {name}{what}")
        output = workdir / name
        recipe = MergeRecipe(
            base=suite.base,
            experts=experts,
            method=name,
            **({"scaling": options.scaling} if "scaling" in method.parameters else {}),
        )
        run_merge(recipe, output, overwrite=True, show_progress=False)
        vision, _ = load_vision_model(str(output))
        if not method.is_moe:
            rows.append(ResultRow(name, None, evaluate(vision, tasks)))
            continue
        oracle = None
        # Collapsing to one expert gives that expert's own MLPs only when the task vectors are dense.
        if oracle_wanted and not recipe.resolved().sparsity:
            timed("evaluating the oracle-routing bound (each task's own expert MLPs)")
            accuracy = {}
            for index, task in enumerate(suite.tasks):
                one_hot = torch.zeros(len(suite.tasks))
                one_hot[index] = 1.0
                accuracy.update(evaluate(vision.collapse(one_hot), [by_name[task.name]]))
            oracle = ResultRow("oracle routing (upper bound)", None, accuracy)
            oracle_wanted = False
        classifier = ZeroShotClassifier(vision, projection)
        adapt_routers(classifier, tasks, options.train, progress=options.progress)
        vision.save_pretrained(workdir / f"{name}-adapted")
        rows.append(ResultRow(name, vision.config.routing, evaluate(vision, tasks)))
        if oracle is not None:
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


def save_results(
    rows: Sequence[ResultRow], tasks: Sequence[str], output: str | Path, preamble: str = ""
) -> None:
    """Write `results.json` (a list of rows) and `results.md` (the table, after `preamble`) into `output`."""
    table = results_markdown(rows, tasks)
    write_results(
        Path(output) / "results.json",
        [row.to_dict() for row in rows],
        markdown=(preamble + "\n\n" if preamble else "") + table,
    )


__all__ = [
    "DEFAULT_METHODS",
    "ExperimentOptions",
    "ResultRow",
    "Suite",
    "SuiteTask",
    "results_markdown",
    "run_experiment",
    "save_results",
]
