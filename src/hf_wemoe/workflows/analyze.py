"""The workflow behind `hf-wemoe analyze`: how large and how low-rank each expert's task vectors are.

For every encoder layer and linear module (q_proj, k_proj, v_proj, out_proj, fc1, fc2) and every expert, the task
vector τ = θ_k − θ_0 of the module's weight is measured by

- its size relative to the pretrained weight, ‖τ‖ / ‖W0‖ (Frobenius norms), and
- the rank that keeps a fraction `energy` (default 0.9) of its energy ‖τ‖², i.e. the fewest singular values whose
  squares sum to that fraction: what `hf-wemoe merge --rank R` would keep of it.

Full fine-tunes and PEFT LoRA adapters alike (a LoRA task vector is scaling·B·A: its singular values come from the
r×r product of the factors' triangular parts, without forming the dense matrix). Tensors are read one at a time,
one per model, like a merge. The result is a markdown table (stdout and `analysis.md`), `analysis.json` and a plot
(`analysis.png`), written atomically to the output folder when one is given.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hf_wemoe.io.adapters import LORA_MODULES, AdapterSource, module_weight_key, open_expert
from hf_wemoe.io.outputs import atomic_output_dir
from hf_wemoe.io.sources import ModelSource, open_source
from hf_wemoe.merging.recipe import check_experts, experts_from_list
from hf_wemoe.utils.progress import progress, progress_enabled, quiet_libraries
from hf_wemoe.workflows.merge import check_compatible, check_output_beside_sources
from hf_wemoe.workflows.plots import plot_task_vector_analysis

ANALYSIS_MARKDOWN = "analysis.md"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_PLOT = "analysis.png"


class AnalyzeConfig(BaseModel):
    """`hf-wemoe analyze` options (the same names in a YAML file given with --config)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(
        description="the pretrained model the experts were fine-tuned from: a Hub repo id with an optional "
        "@revision (org/name@revision) or a local folder",
        json_schema_extra={"metavar": "REF", "required": True},
    )
    experts: dict[str, str] = Field(
        default_factory=dict,
        description="an expert as NAME=REF: a fine-tuned CLIP vision model or a PEFT LoRA adapter of the base "
        "(REF as for --base); repeat once per expert",
        json_schema_extra={"flag": "--expert", "metavar": "NAME=REF", "required": True},
    )
    output: Path | None = Field(
        default=None,
        description="folder for analysis.md, analysis.json and analysis.png (without it, only the table is "
        "printed)",
        json_schema_extra={"metavar": "DIR"},
    )
    overwrite: bool = Field(default=False, description="replace the output folder if it exists")
    energy: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="fraction of each task vector's energy (squared Frobenius norm) the reported rank keeps",
        json_schema_extra={"metavar": "FRACTION"},
    )
    allow_pickle: bool = Field(
        default=False,
        description="accept checkpoints and adapters that only have pickle weights; unpickling files from "
        "untrusted sources can execute arbitrary code, they are loaded with torch.load(weights_only=True)",
    )

    @field_validator("experts", mode="before")
    @classmethod
    def _experts_from_list(cls, value: Any) -> Any:
        return experts_from_list(value)

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: dict[str, str]) -> dict[str, str]:
        return check_experts(experts)

    @model_validator(mode="after")
    def _check_required(self) -> AnalyzeConfig:
        if not self.experts:
            raise ValueError("no experts: pass at least one --expert NAME=REF")
        return self


@dataclass
class ModuleAnalysis:
    """One weight of one encoder layer, for every expert."""

    layer: int
    module: str
    shape: tuple[int, int]
    relative_norm: dict[str, float]
    """Expert -> ‖τ‖ / ‖W0‖."""
    rank: dict[str, int]
    """Expert -> the rank that keeps the analysis's energy fraction of ‖τ‖² (0 for a zero task vector)."""

    @property
    def full_rank(self) -> int:
        """The largest rank a task vector of this shape can have."""
        return min(self.shape)


@dataclass
class AnalyzeSummary:
    """What `run_analyze` measured and wrote."""

    base: str
    experts: dict[str, str]
    """Expert -> what it is: `full fine-tune` or `LoRA r=16 (q_proj, v_proj)`."""
    energy: float
    modules: list[ModuleAnalysis]
    seconds: float
    output: Path | None = None
    files: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The two tables (relative norms, ranks) with a short header, as printed and written to analysis.md."""
        names = list(self.experts)
        percent = f"{100 * self.energy:.4g}%"
        lines = [
            f"# Task vectors of {len(names)} expert{'s' if len(names) != 1 else ''} of `{self.base}`",
            "",
            *[f"- {name}: {kind}" for name, kind in self.experts.items()],
            "",
            "## Relative size ‖τ‖ / ‖W0‖",
            "",
            _table(self.modules, names, lambda row, name: row.relative_norm[name], digits=4),
            "",
            f"## Rank that keeps {percent} of ‖τ‖² (max: the smaller side of the weight)",
            "",
            _table(self.modules, names, lambda row, name: row.rank[name], digits=0, ranks=True),
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The numbers, for scripts: base, experts, energy and one record per layer and module."""
        return {
            "base": self.base,
            "experts": self.experts,
            "energy": self.energy,
            "modules": [
                {
                    "layer": row.layer,
                    "module": row.module,
                    "shape": list(row.shape),
                    "relative_norm": row.relative_norm,
                    "rank": row.rank,
                }
                for row in self.modules
            ],
        }

    def line(self) -> str:
        """One line for the end of the command's output."""
        where = f"; written to {self.output} ({', '.join(self.files)})" if self.output else ""
        return f"analysed {len(self.modules)} weights of {len(self.experts)} experts in {self.seconds:.1f}s{where}"


def _table(
    rows: list[ModuleAnalysis],
    names: list[str],
    value: Callable[[ModuleAnalysis, str], float],
    digits: int,
    ranks: bool = False,
) -> str:
    """A markdown table: one row per layer and module, one column per expert, and a last row of means."""
    header = ["layer", "module", *(["max"] if ranks else []), *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row.layer), row.module, *([str(row.full_rank)] if ranks else [])]
        cells += [f"{value(row, name):.{digits}f}" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    means = [sum(value(row, name) for row in rows) / max(len(rows), 1) for name in names]
    cells = ["mean", "", *([""] if ranks else []), *(f"{mean:.{max(digits, 1)}f}" for mean in means)]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def singular_values(base: torch.Tensor, expert: ModelSource | AdapterSource, key: str) -> torch.Tensor:
    """The singular values of expert's task vector for weight `key` (float64, descending; empty when zero).

    `base` is the pretrained tensor (float). A LoRA task vector B·A (rank r) is reduced to an r×r matrix with the
    same singular values: B = Q_B R_B and Aᵀ = Q_A R_A give B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ.
    """
    if isinstance(expert, AdapterSource):
        pair = expert.factors(key)
        if pair is None:
            return torch.zeros(0, dtype=torch.float64)
        down, up = (tensor.double() for tensor in pair)
        core = torch.linalg.qr(up).R @ torch.linalg.qr(down.T).R.T
        return torch.linalg.svdvals(core)
    tau = expert.get(key).double() - base
    return torch.linalg.svdvals(tau)


def rank_for_energy(values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total (0 when the total is 0)."""
    power = values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # A relative slack of 1e-9 keeps rounding from asking for one more value at energy = 1.
    return min(int((kept < energy - 1e-9).sum()) + 1, len(values))


def analyze_sources(
    base: ModelSource,
    experts: dict[str, ModelSource | AdapterSource],
    energy: float = 0.9,
    show_progress: bool | None = None,
) -> list[ModuleAnalysis]:
    """Measure every expert's task vector of every encoder linear weight, one tensor of each model at a time."""
    layers = range(base.config.num_hidden_layers)
    targets = [
        (layer, module, module_weight_key(layer, module)) for layer in layers for module in LORA_MODULES
    ]
    rows = []
    for layer, module, key in progress(targets, "analyze", len(targets), unit="tensor", show=show_progress):
        theta0 = base.get(key).double()
        base_norm = float(torch.linalg.matrix_norm(theta0))
        norms, ranks = {}, {}
        for name, expert in experts.items():
            values = singular_values(theta0, expert, key)
            norm = math.sqrt(float((values**2).sum()))
            norms[name] = norm / base_norm if base_norm > 0 else math.inf
            ranks[name] = rank_for_energy(values, energy)
        rows.append(ModuleAnalysis(layer, module, tuple(base.shape(key)), norms, ranks))
    return rows


def describe_expert(source: ModelSource | AdapterSource) -> str:
    """What an expert is, in words: `full fine-tune` or `LoRA r=16 (q_proj, v_proj)`."""
    if isinstance(source, AdapterSource):
        ranks = "/".join(str(rank) for rank in source.ranks)
        return f"LoRA r={ranks} ({', '.join(source.targets)}), `{source.reference.text}`"
    return f"full fine-tune, `{source.reference.text}`"


def run_analyze(config: AnalyzeConfig, show_progress: bool | None = None) -> AnalyzeSummary:
    """Open the base and the experts, check that they fit, measure the task vectors, and write the report.

    Raises:
        WEMoEError: an output that exists (without overwrite) or would replace a source, unreadable sources,
            experts that do not match the base, adapters that cannot be read.
    """
    start = time.perf_counter()
    output = Path(config.output).expanduser().absolute() if config.output is not None else None
    if output is not None:
        check_output_beside_sources(output, [config.base, *config.experts.values()], config.overwrite)
    show_progress = progress_enabled(show_progress)
    with quiet_libraries(show_progress):
        base = open_source(config.base, allow_pickle=config.allow_pickle)
        experts = {
            name: open_expert(ref, base, allow_pickle=config.allow_pickle)
            for name, ref in config.experts.items()
        }
        check_compatible(base, experts)
        rows = analyze_sources(base, experts, config.energy, show_progress)
    summary = AnalyzeSummary(
        base=config.base,
        experts={name: describe_expert(source) for name, source in experts.items()},
        energy=config.energy,
        modules=rows,
        seconds=time.perf_counter() - start,
    )
    if output is not None:
        with atomic_output_dir(output, overwrite=config.overwrite) as staging:
            (staging / ANALYSIS_MARKDOWN).write_text(summary.markdown())
            (staging / ANALYSIS_JSON).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
            plot_task_vector_analysis(summary.to_json(), staging / ANALYSIS_PLOT)
        summary.output = output
        summary.files = [ANALYSIS_MARKDOWN, ANALYSIS_JSON, ANALYSIS_PLOT]
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = [
    "ANALYSIS_JSON",
    "ANALYSIS_MARKDOWN",
    "ANALYSIS_PLOT",
    "AnalyzeConfig",
    "AnalyzeSummary",
    "ModuleAnalysis",
    "analyze_sources",
    "describe_expert",
    "rank_for_energy",
    "run_analyze",
    "singular_values",
]
