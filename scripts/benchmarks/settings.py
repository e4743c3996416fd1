"""What every section shares: the CLIP shapes, the merge's size and scale, and the targets the report checks."""

from __future__ import annotations

from typing import NamedTuple

SHAPES: dict[str, dict[str, int]] = {
    "B/32": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    ),
    "L/14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    ),
    # Not a CLIP shape: small enough that `--smoke` checks the whole harness quickly (tests do).
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    ),
}
NUM_EXPERTS = 8
LAMBDA = 0.3
TASK_VECTOR_STD = 2e-3  # typical magnitude of CLIP fine-tuning task vectors
ROUTER_STD = 0.02
NUM_CLASSES = 10
MAX_ABS_DIFF_TARGET = 1e-4
GiB = 1024**3

TARGETS = {
    "per_sample_vs_static": 2.0,
    "speedup_vs_fusionbench": 5.0,
    "batch_vs_static": 1.15,
    "train_peak_rss_gib": 8.0,
    "merge_overhead_gib": 1.5,
    "sparse_size_fraction": 0.30,
    # The low-rank targets hold at this rank.
    "low_rank_rank": 16,
    "low_rank_vs_static": 1.3,
    "low_rank_parameters": 1.25,
}


class Check(NamedTuple):
    """One row of the report's Targets table: the target, what was measured, whether it was met, and the key
    of the note that explains the measurement."""

    target: str
    measured: str
    ok: bool | None
    note: str
