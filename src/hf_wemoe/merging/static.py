"""Static merges: one plain `CLIPVisionModel` from a base and its experts (task arithmetic, averaging, TIES).

Each method is a function of the tensors of one key (the base's and every expert's), computed in float32 and
stored in the base's dtype. The output folder holds a `CLIPVisionModel` config and safetensors weights that
transformers loads without this package.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch

from hf_wemoe.io.weights import ShardedSafetensorsWriter, check_finite
from hf_wemoe.merging.base import OVERFLOW_HINT, MergeJob, MergeMethod
from hf_wemoe.utils.formatting import parse_size


class StaticMergeMethod(MergeMethod):
    """A merge computed key by key: one tensor of every model in memory at a time."""

    card_template: ClassVar[str] = "static_merge.md"
    tags: ClassVar[tuple[str, ...]] = ()

    def prepare(self, job: MergeJob) -> None:
        """Statistics over whole models that `merge_tensor` needs (a first pass); none by default."""

    def merge_tensor(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        """The merged float32 tensor `key` from the base's and the experts' tensors."""
        raise NotImplementedError

    def write(self, job: MergeJob, folder: Path) -> None:
        self.prepare(job)
        config = copy.deepcopy(job.base.config)
        config.architectures = ["CLIPVisionModel"]
        config.provenance = job.provenance
        config.save_pretrained(folder)
        writer = ShardedSafetensorsWriter(folder, parse_size(self.options.max_shard_size))
        for key in job.progress(job.base.keys, f"{self.name}", len(job.base.keys)):
            base = job.base.get(key)
            merged = self.merge_tensor(key, base, list(job.expert_tensors(key))).to(base.dtype)
            check_finite(merged, f"the merged tensor '{key}'", OVERFLOW_HINT)
            writer.add(key, merged)
        writer.finish()


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """The stacked float32 task vectors (K, *shape): expert minus base."""
    base = base.float()
    return torch.stack([expert.float() - base for expert in experts])


def task_arithmetic(base: torch.Tensor, experts: Iterable[torch.Tensor], scaling: float) -> torch.Tensor:
    """theta0 + scaling * sum_k (theta_k - theta0), in float32 (scaling 1/K gives the experts' mean).

    The task vectors are summed one at a time in expert order, so memory holds one of them besides the sum, and
    every caller (the merge methods, WEMoE outside its MLPs, the toy world's table) gets the same bits.
    """
    base = base.float()
    total = torch.zeros_like(base)
    for expert in experts:
        total += expert.float() - base
    return base + scaling * total


class TaskArithmetic(StaticMergeMethod):
    """theta0 + lambda * sum_k tau_k."""

    name = "task-arithmetic"
    summary = "base plus scaling times the sum of the task vectors"
    parameters = ("scaling",)
    tags = ("task-arithmetic",)

    def merge_tensor(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        return task_arithmetic(base, experts, self.options.scaling)


class Average(StaticMergeMethod):
    """The mean of the experts' weights."""

    name = "average"
    summary = "mean of the experts' weights"
    parameters = ()
    tags = ("weight-averaging",)

    def merge_tensor(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros_like(base, dtype=torch.float32)
        for expert in experts:
            total.add_(expert.float())
        return total / len(experts)


class Ties(StaticMergeMethod):
    """TIES merging: trim, elect sign, disjoint mean, scale.

    1. Trim: each expert's task vector (all tensors together) keeps its `ties_keep` fraction of largest
       magnitudes; the rest is zeroed. The magnitude threshold is computed per expert over the whole model
       in a first pass.
    2. Elect: per entry, the sign of the sum of the trimmed task vectors (the sign with the larger total
       magnitude).
    3. Disjoint mean: per entry, the mean of the trimmed values that are non-zero and have the elected sign.
    4. theta0 + lambda * that mean.
    """

    name = "ties"
    summary = "trim task vectors to their largest entries, elect signs, average the agreeing entries, scale"
    parameters = ("scaling", "ties_keep")
    tags = ("ties",)

    def prepare(self, job: MergeJob) -> None:
        keys = job.base.keys
        numel = sum(math.prod(job.base.shape(key)) for key in keys)
        kept = max(1, math.ceil(round(self.options.ties_keep * numel, 6)))
        self.thresholds: list[float] = []
        # One expert at a time: memory holds the magnitudes of one model, never all experts together.
        experts = list(job.experts.values())
        for source in job.progress(experts, "ties: trim thresholds", len(experts)):
            magnitudes = torch.empty(numel, dtype=torch.float32)
            offset = 0
            for key in keys:
                delta = (source.get(key).float() - job.base.get(key).float()).abs().reshape(-1)
                magnitudes[offset : offset + delta.numel()] = delta
                offset += delta.numel()
            # The kept-th largest magnitude; entries at least this large survive the trim.
            self.thresholds.append(float(torch.kthvalue(magnitudes, numel - kept + 1).values))
            del magnitudes

    def merge_tensor(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        deltas = task_vectors(base, experts)
        thresholds = torch.tensor(self.thresholds).view(-1, *([1] * (deltas.dim() - 1)))
        trimmed = torch.where(deltas.abs() >= thresholds, deltas, torch.zeros_like(deltas))
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0).clamp(min=1)
        merged = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0) / count
        return base.float() + self.options.scaling * merged


__all__ = ["Average", "StaticMergeMethod", "TaskArithmetic", "Ties", "task_arithmetic", "task_vectors"]
