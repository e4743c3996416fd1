"""The papers' other experiments, run by `run_experiment` like the demo and TA8: the E-WEMoE sparsity sweep,
generalization to unseen tasks and robustness to corrupted test data (`scripts/reproduce_sparsity.py`,
`reproduce_generalization.py`, `reproduce_robustness.py`). Each function returns rows of the common schema
(`ResultRow`, saved with `save_results`); each `*_table` is the protocol's summary next to reported numbers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.formatting import format_size
from hf_wemoe.workflows.experiment import (
    ExperimentOptions,
    MergeSpec,
    ResultRow,
    format_count,
    run_experiment,
)
from hf_wemoe.workflows.suites import Suite, check_condition

# ----------------------------------------------------------------------------------------------------------------
# Sparsity sweep

SPARSITY_POINTS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
# The references drawn next to the sweep: dense WEMoE (a router per layer) and task arithmetic.
SWEEP_REFERENCES = ("task-arithmetic", "wemoe")


def sparsity_label(sparsity: float) -> str:
    """The row name of E-WEMoE at one sparsity, e.g. `e-wemoe (sparsity 0.9)`."""
    return f"e-wemoe (sparsity {sparsity:g})"


def check_points(values: Sequence[float], what: str, example: str, valid: Callable[[float], bool], rule: str):
    """A sweep's points as given, or a `WEMoEError` for none (showing `example`), a repeated one, or one that is
    not `valid` (saying the `rule`)."""
    points = list(values)
    if not points:
        raise WEMoEError(f"no {what} given; e.g. {example}")
    bad = [value for value in points if not valid(value)]
    if bad:
        raise WEMoEError(f"{rule}, got {bad}")
    if len(set(points)) != len(points):
        raise WEMoEError(f"a {what} is given twice in {points}")
    return points


def check_sparsities(sparsities: Sequence[float]) -> list[float]:
    """The sweep's points, or a `WEMoEError` for none, a repeated one or one outside [0, 1)."""
    return check_points(
        [float(value) for value in sparsities],
        "sparsity",
        "--sparsity 0.0,0.5,0.9",
        lambda value: 0.0 <= value < 1.0,
        "sparsity must be in [0, 1) (the fraction of each task vector removed)",
    )


def run_sweep(
    suite: Suite,
    workdir: str | Path,
    references: Sequence[str],
    points: Sequence[MergeSpec],
    options: ExperimentOptions | None,
    oracle: bool,
    log: Callable[[str], None],
) -> list[ResultRow]:
    """The reference methods, then the merges of a sweep's `points`, through `run_experiment`; every merge's rows
    carry its parameters and saved size, and `oracle` adds each MoE merge's own oracle-routing bound."""
    methods: list[str | MergeSpec] = [*references, *points, *(["oracle"] if oracle else [])]
    options = replace(options or ExperimentOptions(), methods=methods, record_size=True)
    return run_experiment(suite, workdir, options, log)


def run_sparsity_sweep(
    suite: Suite,
    workdir: str | Path,
    sparsities: Sequence[float] = SPARSITY_POINTS,
    options: ExperimentOptions | None = None,
    oracle: bool = False,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """E-WEMoE (shared router, sparse task vectors) at every sparsity, with task arithmetic and dense WEMoE as
    references; every merge's rows carry its parameters and saved size. `oracle` adds each MoE merge's own
    oracle-routing bound (what routing can reach with the task vectors as pruned)."""
    points = [MergeSpec("e-wemoe", {"sparsity": value}, sparsity_label(value)) for value in check_sparsities(sparsities)]
    return run_sweep(suite, workdir, SWEEP_REFERENCES, points, options, oracle, log)


def sparsity_table(
    rows: Sequence[ResultRow], sparsities: Sequence[float], reported: Mapping[float, float] | None = None
) -> str:
    """Average accuracy, parameters and saved size of E-WEMoE against sparsity (one line per point and
    adaptation), then the references, with the reported average where the papers give one."""
    reported = reported or {}
    per_task = [row for row in rows if row.stream == "per task"]
    dense = next((row for row in per_task if row.method == "wemoe"), None)
    lines = [
        "| method | sparsity | adaptation | average | own oracle bound | parameters | saved size | size vs dense "
        "WEMoE | reported average |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    bounds = {row.method: row for row in rows if row.method.startswith("oracle routing (")}

    def line(row: ResultRow, sparsity: str, paper: float | None) -> str:
        bound = bounds.get(f"oracle routing ({row.method} bound)")
        ratio = (
            f"{row.saved_bytes / dense.saved_bytes:.2f}×"
            if dense is not None and dense.saved_bytes and row.saved_bytes is not None
            else "–"
        )
        return (
            f"| {row.method} | {sparsity} | {row.adaptation or '–'} | {row.average:.1f} | "
            f"{'–' if bound is None else f'{bound.average:.1f}'} | {format_count(row.parameters)} | "
            f"{'–' if row.saved_bytes is None else format_size(row.saved_bytes)} | {ratio} | "
            f"{'–' if paper is None else f'{paper:.1f}'} |"
        )

    for value in sparsities:
        for row in per_task:
            if row.method == sparsity_label(value):
                lines.append(line(row, f"{value:g}", reported.get(value)))
    for row in per_task:
        if row.method in SWEEP_REFERENCES:
            lines.append(line(row, "0 (dense)" if row.method == "wemoe" else "–", None))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Rank sweep (compact experts, beyond the papers)

RANK_POINTS = (2, 4, 8, 16, 32)
# The references of the rank sweep: the static merge and the papers' two MoE methods, dense and sparse.
RANK_REFERENCES = ("task-arithmetic", "wemoe", "e-wemoe")


def rank_label(rank: int) -> str:
    """The row name of low-rank WEMoE at one rank, e.g. `wemoe (rank 8)`."""
    return f"wemoe (rank {rank})"


def check_ranks(ranks: Sequence[int]) -> list[int]:
    """The sweep's ranks, or a `WEMoEError` for none, a repeated one or one below 1."""
    return check_points(
        [int(value) for value in ranks],
        "rank",
        "--ranks 2,4,8,16,32",
        lambda value: value >= 1,
        "ranks must be positive integers",
    )


def run_rank_sweep(
    suite: Suite,
    workdir: str | Path,
    ranks: Sequence[int] = RANK_POINTS,
    options: ExperimentOptions | None = None,
    oracle: bool = False,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """WEMoE with rank-R task vectors (`hf-wemoe merge --rank R`) at every rank, with task arithmetic, dense WEMoE
    and E-WEMoE as references; every merge's rows carry its parameters and saved size. `oracle` adds each MoE
    merge's own oracle-routing bound (what routing can reach with the task vectors as truncated)."""
    points = [MergeSpec("wemoe", {"rank": value}, rank_label(value)) for value in check_ranks(ranks)]
    return run_sweep(suite, workdir, RANK_REFERENCES, points, options, oracle, log)


def rank_table(
    rows: Sequence[ResultRow],
    ranks: Sequence[int],
    backbone_parameters: int,
    forward_ratios: Mapping[str, float] | None = None,
) -> str:
    """Average accuracy after adaptation, stored parameters against one backbone, saved size and forward time
    against the static merge, per rank and for the references."""
    forward_ratios = forward_ratios or {}
    per_task = [row for row in rows if row.stream == "per task"]
    dense = next((row for row in per_task if row.method == "wemoe"), None)
    bounds = {row.method: row for row in rows if row.method.startswith("oracle routing (")}
    lines = [
        "| method | rank | adaptation | average | vs dense WEMoE | own oracle bound | parameters | vs backbone | "
        "saved size | forward time vs static |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(row: ResultRow, rank: str) -> str:
        bound = bounds.get(f"oracle routing ({row.method} bound)")
        gap = "–" if dense is None or row is dense else f"{row.average - dense.average:+.1f}"
        ratio = forward_ratios.get(row.method)
        return (
            f"| {row.method} | {rank} | {row.adaptation or '–'} | {row.average:.1f} | {gap} | "
            f"{'–' if bound is None else f'{bound.average:.1f}'} | {format_count(row.parameters)} | "
            f"{'–' if row.parameters is None else f'{row.parameters / backbone_parameters:.2f}×'} | "
            f"{'–' if row.saved_bytes is None else format_size(row.saved_bytes)} | "
            f"{'–' if ratio is None else f'{ratio:.2f}×'} |"
        )

    for value in ranks:
        for row in per_task:
            if row.method == rank_label(value):
                lines.append(line(row, str(value)))
    for row in per_task:
        if row.method in RANK_REFERENCES:
            lines.append(line(row, "full" if row.method != "task-arithmetic" else "–"))
    return "\n".join(lines)


def forward_time_ratios(
    folders: Mapping[str, str | Path], reference: str, batch: int = 128, repeats: int = 5
) -> dict[str, float]:
    """Forward time of every saved vision model in `folders` (name -> folder) over the one named `reference`:
    medians of `repeats` round-robin forwards on one batch of random images (the time does not depend on the
    pixels), after one untimed warm-up each, in this process and with its threads."""
    import statistics
    import time

    import torch

    from hf_wemoe.zeroshot.classifier import load_vision_model

    models = {name: load_vision_model(str(folder))[0].eval() for name, folder in folders.items()}
    size = models[reference].config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixels)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(pixels)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {name: value / medians[reference] for name, value in medians.items()}


# ----------------------------------------------------------------------------------------------------------------
# Generalization


def generalization_table(
    rows: Sequence[ResultRow], unseen: Sequence[str], reported: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """Seen average, every unseen task and the unseen average per row, next to the reported ones (`reported`:
    method -> {"seen": ..., "unseen": ..., <task>: ...})."""
    reported = reported or {}
    lines = [
        "| method | adaptation | seen average | " + " | ".join(f"{t} (unseen)" for t in unseen)
        + " | unseen average | reported seen | reported unseen |",
        "|---|---|" + "---:|" * (len(unseen) + 4),
    ]
    for row in rows:
        if row.stream != "per task":
            continue
        paper = reported.get(row.method, {})
        cells = [_cell(row.seen_average)] + [_cell(row.accuracy.get(t)) for t in unseen]
        cells += [_cell(row.unseen_average), _cell(paper.get("seen")), _cell(paper.get("unseen"))]
        lines.append(f"| {row.method} | {row.adaptation or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Robustness


def run_robustness(
    suite_for: Callable[[str], Suite],
    conditions: Sequence[str],
    workdir: str | Path,
    options: ExperimentOptions,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """Run the experiment once per test condition (`clean` or a corruption): `suite_for(condition)` gives the
    suite whose test splits are that condition's, on which the routers are adapted and every model evaluated.
    Rows carry their condition as `split`."""
    for condition in conditions:
        check_condition(condition)
    if len(set(conditions)) != len(conditions):
        raise WEMoEError(f"a corruption is given twice in {list(conditions)}")
    rows: list[ResultRow] = []
    for condition in conditions:
        log(f"=== test split: {condition}")
        for row in run_experiment(suite_for(condition), Path(workdir) / condition, options, log):
            row.split = condition
            rows.append(row)
    return rows


def robustness_table(
    rows: Sequence[ResultRow],
    conditions: Sequence[str],
    reported: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """Average accuracy per method (rows) and test condition (columns), the reported averages below each method
    measured; a cell where the adaptation monitor saw a task collapse names it (`!`), and the lowest task of
    each cell is listed, so a collapse under heavy noise shows in the summary too."""
    reported = reported or {}
    lines = [
        "| method | adaptation | " + " | ".join(conditions) + " |",
        "|---|---|" + "---:|" * len(conditions),
    ]
    keys: list[tuple[str, str | None]] = []
    for row in rows:
        if row.stream == "per task" and (row.method, row.adaptation) not in keys:
            keys.append((row.method, row.adaptation))
    for method, adaptation in keys:
        cells = []
        for condition in conditions:
            row = next(
                (r for r in rows if (r.method, r.adaptation, r.split, r.stream) ==
                 (method, adaptation, condition, "per task")),
                None,
            )  # fmt: skip
            if row is None:
                cells.append("–")
                continue
            worst = min(row.accuracy, key=row.accuracy.get)
            collapsed = f", collapsed: {', '.join(row.collapsed)}!" if row.collapsed else ""
            cells.append(f"{row.average:.1f} (min {worst} {row.accuracy[worst]:.1f}{collapsed})")
        lines.append(f"| {method} | {adaptation or '–'} | " + " | ".join(cells) + " |")
        if method in reported:
            paper = reported[method]
            lines.append(
                f"| {method}, reported | – | " + " | ".join(_cell(paper.get(c)) for c in conditions) + " |"
            )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


__all__ = [
    "RANK_POINTS",
    "RANK_REFERENCES",
    "SPARSITY_POINTS",
    "SWEEP_REFERENCES",
    "check_points",
    "check_ranks",
    "check_sparsities",
    "forward_time_ratios",
    "generalization_table",
    "rank_label",
    "rank_table",
    "robustness_table",
    "run_rank_sweep",
    "run_sweep",
    "run_robustness",
    "run_sparsity_sweep",
    "sparsity_label",
    "sparsity_table",
]
