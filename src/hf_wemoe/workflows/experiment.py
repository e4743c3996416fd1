"""A multi-task merging experiment, end to end: what `hf-wemoe demo` and `scripts/reproduce_ta8.py` run.

Given a pretrained CLIP model, one fine-tuned expert per task and each task's test data, it evaluates the
pretrained model (zero-shot), every expert on its own task, the static merges (average, task arithmetic, TIES),
WEMoE and E-WEMoE after each of the requested router adaptations (`Adaptation`: the papers' entropy minimisation,
the training-free calibration, other objectives), and for every MoE method its own oracle-routing bound (the
merged model collapsed, for each task, to that task's own expert task vectors *as stored*: for E-WEMoE the
pruned ones). An adaptation with `mixed_stream` also evaluates its model on one shuffled stream of all tasks
(each batch mixes tasks) with per-sample and batch routing. Merges go through `run_merge`, adaptation through
`adapt_routers` and `calibrate_routers`, the same code as `hf-wemoe merge`, `train` and `calibrate`; evaluation
uses the same heads and metric as `hf-wemoe eval`.

The other protocols run through the same function: a method may be a `MergeSpec` with its own options (the
sparsity sweep's E-WEMoE at several sparsities), rows can carry the merged model's parameters and saved size
(`ExperimentOptions.record_size`), and a suite's unseen tasks (no expert) are evaluated with every model but never
merged or adapted on, with seen and unseen averages in every row (generalization).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_wemoe.adaptation import TrainOptions, adapt_routers, load_router_state, objective_label, router_state
from hf_wemoe.calibration import calibrate_routers
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import evaluate_mixed_stream, evaluate_tasks, write_results
from hf_wemoe.io.weights import weight_files
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.merging.registry import get_method
from hf_wemoe.utils.formatting import format_size
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

# Rows that are not merges: the pretrained model, each expert on its own task, and each MoE method's own
# oracle-routing bound (shown after the method's rows).
PRETRAINED, INDIVIDUAL, ORACLE = "pretrained", "individual", "oracle"
DEFAULT_METHODS = (PRETRAINED, INDIVIDUAL, "average", "task-arithmetic", "ties", "wemoe", "e-wemoe", ORACLE)


@dataclass
class Adaptation:
    """One way to set a MoE merge's routers before it is evaluated: the training-free calibration
    (`calibrate_routers`, from `calibration_images` unlabelled images per task), gradient steps
    (`adapt_routers` with `train`), or the calibration followed by gradient steps."""

    train: TrainOptions | None = None
    calibrate: bool = False
    calibration_images: int = 64
    mixed_stream: bool = False
    """Also evaluate the adapted model on one shuffled stream of all tasks, with per-sample and batch routing."""

    @property
    def label(self) -> str:
        """What produced a row, e.g. `entropy, 200 steps` or `calibrated + infomax + routing 1, 200 steps`."""
        parts = ["calibrated"] if self.calibrate else []
        if self.train is not None:
            parts.append(f"{objective_label(self.train)}, {self.train.steps} steps")
        return " + ".join(parts) or "none (the merge as built)"


@dataclass
class MergeSpec:
    """One merge of an experiment: a registered method with options of `MergeRecipe` (e.g. `{"sparsity": 0.5}`),
    its rows named `label` (default: the method's name), and for a MoE method the adaptations it gets (default:
    the experiment's)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    adaptations: Sequence[Adaptation] | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclass
class ExperimentOptions:
    """What to run and how to adapt.

    `methods` lists the rows in order: merge method names or `MergeSpec`s (any registered method: static ones are
    evaluated as merged, MoE ones after each of `adaptations`) and `pretrained`, `individual` and `oracle`.
    `adaptations` defaults to the papers' one: entropy minimisation with `train`. With `record_size` every merge's
    rows carry its stored parameters and saved size.
    """

    methods: Sequence[str | MergeSpec] = DEFAULT_METHODS
    scaling: float = 0.3
    train: TrainOptions = field(default_factory=TrainOptions)
    adaptations: Sequence[Adaptation] | None = None
    eval_batch_size: int = 128
    device: str | None = None
    progress: bool | None = None
    """Progress of evaluation, adaptation and downloads: None follows the package's policy, False shows none."""
    record_size: bool = False

    def merge_specs(self) -> list[MergeSpec]:
        """The merges of `methods`, in order; a `WEMoEError` for an unknown method or two merges of one name."""
        merges = [method for method in self.methods if not _is_reference(method)]
        specs = [method if isinstance(method, MergeSpec) else MergeSpec(method) for method in merges]
        for spec in specs:
            get_method(spec.method)
        names = [spec.name for spec in specs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise WEMoEError(f"two merges are named {repeated}; give each MergeSpec its own label")
        return specs

    def resolved_adaptations(self) -> list[Adaptation]:
        return list(self.adaptations) if self.adaptations is not None else [Adaptation(train=self.train)]


def _is_reference(method: str | MergeSpec) -> bool:
    return isinstance(method, str) and method in (PRETRAINED, INDIVIDUAL, ORACLE)


@dataclass
class ResultRow:
    """One line of the results table: accuracy (percent) per task for a method, how its routers were set, its
    routing mode and evaluation stream, and the CPU/GPU seconds its router adaptation took.

    Optional parts, in `to_dict` and the table only when set: `split` (the test split it was adapted and evaluated
    on, e.g. a corruption), `unseen` (the suite's tasks without an expert: seen and unseen averages), `parameters`
    and `saved_bytes` (the merged model's stored values and the bytes of its safetensors files)."""

    method: str
    routing: str | None
    accuracy: dict[str, float]
    adaptation: str | None = None
    stream: str = "per task"
    seconds: float | None = None
    collapsed: list[str] = field(default_factory=list)
    """Tasks the adaptation monitor saw collapse."""
    split: str | None = None
    unseen: list[str] = field(default_factory=list)
    parameters: int | None = None
    saved_bytes: int | None = None

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def seen_average(self) -> float | None:
        """Mean accuracy over the row's tasks that had an expert (None when it has none)."""
        return _mean([value for task, value in self.accuracy.items() if task not in self.unseen])

    @property
    def unseen_average(self) -> float | None:
        """Mean accuracy over the row's unseen tasks (None when it evaluated none)."""
        return _mean([value for task, value in self.accuracy.items() if task in self.unseen])

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "method": self.method,
            "adaptation": self.adaptation,
            "routing": self.routing,
            "stream": self.stream,
        }
        if self.split is not None:
            data["split"] = self.split
        data.update({task: round(value, 2) for task, value in self.accuracy.items()})
        data["average"] = round(self.average, 2)
        if self.unseen:
            data["seen_average"] = _round(self.seen_average)
            data["unseen_average"] = _round(self.unseen_average)
        if self.parameters is not None or self.saved_bytes is not None:
            data["parameters"], data["saved_bytes"] = self.parameters, self.saved_bytes
        data["seconds"] = _round(self.seconds, 1)
        data["collapsed"] = list(self.collapsed)
        return data


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def run_experiment(
    suite: Suite,
    workdir: str | Path,
    options: ExperimentOptions | None = None,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """Merge, adapt and evaluate every method of `options` on `suite`; models are written under `workdir`."""
    options = options or ExperimentOptions()
    methods = options.merge_specs()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries(options.progress):
        return _run(suite, workdir, options, methods, log)


def load_suite(suite: Suite, progress: bool | None = None) -> tuple[torch.nn.Linear, list[ClassificationTask]]:
    """The base's visual projection and the suite's tasks (labelled test data and zero-shot heads)."""
    processor = load_image_processor(suite.base)
    projection = load_visual_projection(suite.base)
    tasks = prepare_tasks(
        {task.name: task.dataset for task in suite.tasks},
        suite.base,
        processor,
        templates={task.name: task.templates for task in suite.tasks if task.templates is not None},
        require_labels=True,
        progress=progress,
    )
    return projection, tasks


def oracle_accuracy(
    vision: torch.nn.Module,
    projection: torch.nn.Linear,
    tasks: Sequence[ClassificationTask],
    batch_size: int = 128,
    device: str | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """A MoE merge's own oracle-routing bound: each task evaluated with the model collapsed to routing one-hot on
    the expert of the same name (its task vectors as stored: pruned ones for a sparse merge)."""
    experts = list(vision.config.expert_names)
    accuracy = {}
    for task in tasks:
        one_hot = torch.zeros(len(experts))
        one_hot[experts.index(task.name)] = 1.0
        classifier = ZeroShotClassifier(vision.collapse(one_hot), projection).to(device or "cpu")
        accuracy.update(evaluate_tasks(classifier, [task], batch_size, device, progress=progress).accuracy)
    return accuracy


def _folder_name(name: str) -> str:
    """A merge's folder under the work folder: its name with anything but letters, digits, `.`, `_`, `-` as `-`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "merge"


def merge_folder(workdir: str | Path, name: str, adaptation: int | None = None) -> Path:
    """Where `run_experiment` wrote the merge `name` under `workdir`, or with `adaptation` (its position in the
    adaptations) that merge after the adaptation."""
    folder = _folder_name(name)
    return Path(workdir) / (folder if adaptation is None else f"{folder}-adapted-{adaptation}")


def _run(
    suite: Suite, workdir: Path, options: ExperimentOptions, methods: list[MergeSpec], log
) -> list[ResultRow]:
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    projection, tasks = load_suite(suite, options.progress)
    by_name = {task.name: task for task in tasks}
    # Unseen tasks (no expert) are evaluated with every model; only the seen ones are merged and adapted on.
    seen = [by_name[name] for name in suite.seen]
    unseen = suite.unseen
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
        rows.append(ResultRow("pretrained (zero-shot)", None, evaluate(vision, tasks), unseen=unseen))
    if INDIVIDUAL in options.methods:
        timed("evaluating every expert on its own task")
        accuracy = {}
        for task in suite.tasks:
            if task.expert is None:
                continue  # an unseen task has no expert of its own
            vision, _ = load_vision_model(task.expert)
            accuracy.update(evaluate(vision, [by_name[task.name]]))
        rows.append(ResultRow("individual experts", None, accuracy, unseen=unseen))
    experts = {task.name: task.expert for task in suite.tasks if task.expert is not None}
    for spec in methods:
        name, method = spec.name, get_method(spec.method)
        timed(f"merging with {name}")
        output = workdir / _folder_name(name)
        recipe = MergeRecipe(
            base=suite.base,
            experts=experts,
            method=spec.method,
            **({"scaling": options.scaling} if "scaling" in method.parameters else {}),
            **spec.options,
        )
        summary = run_merge(recipe, output, overwrite=True, show_progress=False)
        # The checkpoint's own bytes: its safetensors files (not the model code, card and configs beside them).
        saved = sum(path.stat().st_size for path in weight_files(output))
        size = {"parameters": summary.parameters, "saved_bytes": saved} if options.record_size else {}
        if not method.is_moe:
            vision, _ = load_vision_model(str(output))
            rows.append(ResultRow(name, None, evaluate(vision, tasks), unseen=unseen, **size))
            continue
        vision, _ = load_vision_model(str(output))
        as_built = router_state(vision)  # every adaptation starts from the merge as built
        oracle = None
        if ORACLE in options.methods:
            # The method's own bound: its stored task vectors (pruned ones for a sparse merge), one task at a time.
            timed(f"evaluating {name}'s oracle-routing bound (each task's own stored task vectors)")
            accuracy = oracle_accuracy(
                vision, projection, seen, options.eval_batch_size, device, options.progress
            )
            oracle = ResultRow(f"oracle routing ({name} bound)", None, accuracy, unseen=unseen)
        adaptations = spec.adaptations if spec.adaptations is not None else options.resolved_adaptations()
        for position, adaptation in enumerate(adaptations):
            timed(f"{name}: {adaptation.label}")
            load_router_state(vision, as_built)
            classifier = ZeroShotClassifier(vision, projection).to(device)
            start, collapsed = time.process_time(), []
            if adaptation.calibrate:
                calibrate_routers(
                    vision,
                    seen,
                    images_per_task=adaptation.calibration_images,
                    seed=options.train.seed,
                    progress=options.progress,
                )
            if adaptation.train is not None:
                trained = adapt_routers(classifier, seen, adaptation.train, progress=options.progress)
                collapsed = sorted((trained.get("monitor") or {}).get("collapsed", {}))
            seconds = time.process_time() - start
            vision.save_pretrained(workdir / f"{_folder_name(name)}-adapted-{position}")
            routing = vision.config.routing
            common = {"seconds": seconds, "collapsed": collapsed, "unseen": unseen, **size}
            rows.append(ResultRow(name, routing, evaluate(vision, tasks), adaptation.label, **common))
            if adaptation.mixed_stream:
                for mode in ("sample", "batch"):
                    vision.set_routing(mode)
                    result = evaluate_mixed_stream(
                        classifier, tasks, options.eval_batch_size, seed=options.train.seed, progress=options.progress
                    )
                    rows.append(
                        ResultRow(
                            name,
                            mode,
                            result.accuracy,
                            adaptation.label,
                            stream=f"mixed, batch {options.eval_batch_size}",
                            **common,
                        )
                    )
                vision.set_routing(routing)
        if oracle is not None:
            rows.append(oracle)
    return rows


def results_markdown(rows: Sequence[ResultRow], tasks: Sequence[str]) -> str:
    """The results as a markdown table: methods in rows (with how their routers were set, the routing mode and
    the evaluation stream), tasks, the average and the adaptation time in columns. Tasks the adaptation monitor
    saw collapse are marked with `!`.

    Columns appear for the optional parts when a row has them: `test split` after the stream, unseen tasks marked
    `(unseen)` with `seen average` and `unseen average` after the average, `parameters` and `saved size`."""
    with_split = any(row.split is not None for row in rows)
    unseen = {task for row in rows for task in row.unseen}
    with_size = any(row.parameters is not None or row.saved_bytes is not None for row in rows)
    header = ["method", "adaptation", "routing", "stream", *(["test split"] if with_split else [])]
    header += [f"{t} (unseen)" if t in unseen else t for t in tasks] + ["average"]
    header += ["seen average", "unseen average"] if unseen else []
    header += ["parameters", "saved size"] if with_size else []
    header.append("adaptation time")
    text_columns = 4 + with_split
    rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in rows:
        cells = [row.method, row.adaptation or "–", row.routing or "–", row.stream]
        cells += [row.split or "–"] if with_split else []
        cells += [
            (f"{row.accuracy[t]:.1f}" + ("!" if t in row.collapsed else "")) if t in row.accuracy else "–"
            for t in tasks
        ]
        cells.append(f"{row.average:.1f}")
        if unseen:
            cells += [_percent(row.seen_average), _percent(row.unseen_average)]
        if with_size:
            saved = "–" if row.saved_bytes is None else format_size(row.saved_bytes)
            cells += [format_count(row.parameters), saved]
        cells.append("–" if row.seconds is None else f"{row.seconds:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_count(count: int | None) -> str:
    """A parameter count as the tables show it: `87.46 M`, `596.7 k`, `950`."""
    if count is None:
        return "–"
    if count >= 10**6:
        return f"{count / 10**6:.2f} M"
    return f"{count / 10**3:.1f} k" if count >= 10**3 else str(count)


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
    "merge_folder",
    "Adaptation",
    "ExperimentOptions",
    "MergeSpec",
    "ResultRow",
    "format_count",
    "Suite",
    "SuiteTask",
    "results_markdown",
    "run_experiment",
    "load_suite",
    "oracle_accuracy",
    "save_results",
]
