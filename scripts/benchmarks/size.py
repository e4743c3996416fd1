"""Size section: saved size of WEMoE dense and E-WEMoE-90%, float32 and bfloat16 task vectors (written by
`hf-wemoe merge` in the merge section's run), and where E-WEMoE-90%'s bytes go."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.formatting import fmt_gib
from benchmarks.settings import LAMBDA, TARGETS, Check, GiB
from benchmarks.variants import base_config, expert_names
from hf_wemoe import WEMoECLIPVisionModel
from hf_wemoe.merging.wemoe import wemoe_config

# The merges this section adds to the merge section's dense float32 one: name -> (method, dtype).
OUTPUTS = {
    "E-WEMoE-90%, float32": ("e-wemoe", "float32"),
    "WEMoE dense, bfloat16": ("wemoe", "bfloat16"),
    "E-WEMoE-90%, bfloat16": ("e-wemoe", "bfloat16"),
}


def checks(args: argparse.Namespace, merge: dict[str, Any]) -> list[Check]:
    """E-WEMoE-90%'s saved size as a fraction of the dense one, per task-vector dtype."""
    result = []
    for dtype in ("float32", "bfloat16"):
        d = merge["merges"].get(f"WEMoE dense, {dtype}", {}).get("output_bytes")
        s = merge["merges"].get(f"E-WEMoE-90%, {dtype}", {}).get("output_bytes")
        if d and s:
            result.append(
                Check(
                    f"E-WEMoE-90% checkpoint <= {TARGETS['sparse_size_fraction']:.0%} of the dense one ({dtype})",
                    f"{s / d:.1%} ({fmt_gib(s)} vs {fmt_gib(d)})",
                    s / d <= TARGETS["sparse_size_fraction"],
                    "size",
                )
            )
    return result


def checkpoint_bytes(shape: str, dtype: str, sparse: bool) -> dict[str, int]:
    """Bytes of the tensors a merge saves, by part, counted on a meta-device model (no memory, no weights).

    `values`: the task vectors (kept entries when sparse); `positions`: the sparse position tensors
    (`*_indices`, `*_block_counts`); `rest`: the non-MLP weights, pretrained MLPs and routers (float32, the
    dtype of the base checkpoints). Sparse is E-WEMoE-90%: 90% sparsity and one shared router.
    """
    options = dict(sparsity=0.9, shared_router=True) if sparse else {}
    config = wemoe_config(
        base_config(shape), expert_names(), scaling=LAMBDA, task_vector_dtype=dtype, **options
    )
    with torch.device("meta"):
        model = WEMoECLIPVisionModel(config)
    parts = {"values": 0, "positions": 0, "rest": 0}
    for key, tensor in model.state_dict().items():
        if ".task_vectors." not in key:
            part = "rest"
        else:
            part = "positions" if key.endswith(("_indices", "_block_counts")) else "values"
        parts[part] += tensor.numel() * tensor.element_size()
    return parts


def size_note(shape: str) -> str:
    """The saved-size note: where E-WEMoE-90%'s bytes go, from the exact tensor sizes at `shape`."""
    size = {
        (dtype, sparse): checkpoint_bytes(shape, dtype, sparse)
        for dtype in ("float32", "bfloat16")
        for sparse in (False, True)
    }
    dense16, sparse16 = sum(size["bfloat16", False].values()), sum(size["bfloat16", True].values())

    def task_vector_fraction(dtype: str) -> float:
        kept = size[dtype, True]
        return (kept["values"] + kept["positions"]) / size[dtype, False]["values"]

    rest = size["bfloat16", True]["rest"]
    free_positions = (rest + size["bfloat16", True]["values"]) / dense16
    # Everything in bfloat16: the rest halves in both checkpoints.
    all16 = (sparse16 - rest / 2) / (dense16 - size["bfloat16", False]["rest"] / 2)
    return (
        "E-WEMoE-90% stores the kept 10% of every task vector as values plus their positions: for every expert "
        "and tensor, the kept entries' flat positions in increasing order, each as a 16-bit offset inside its "
        "block of 65536 entries (`*_indices`, int16), and one int32 count of kept entries per block "
        "(`*_block_counts`). That is 2 bytes per kept entry (4 with int32 flat indices) plus 4 bytes per 65536 "
        f"entries, so its task vectors take {task_vector_fraction('float32'):.1%} (float32) or "
        f"{task_vector_fraction('bfloat16'):.1%} (bfloat16) of the dense ones. Both checkpoints also store, in "
        "full and in the base checkpoints' float32, the non-MLP weights and the pretrained MLPs (plus the routers): "
        f"{rest / GiB:.2f} GiB in E-WEMoE-90%. That is {rest / sum(size['float32', False].values()):.1%} of the "
        f"dense float32 checkpoint, but {rest / dense16:.1%} of the dense bfloat16 one, so in bfloat16 "
        f"E-WEMoE-90% stays at {sparse16 / dense16:.1%}, {100 * (sparse16 / dense16 - 0.30):.1f} points above "
        f"30%. Positions cannot close that gap: even positions costing nothing would leave {free_positions:.1%}, "
        f"and storing those weights in bfloat16 as well would give {all16:.1%}."
    )


def notes(args: argparse.Namespace) -> dict[str, str]:
    """Where E-WEMoE-90%'s bytes go."""
    return {"size": size_note(args.shape)}
