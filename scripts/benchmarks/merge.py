"""Merge section: `hf-wemoe merge` of 8 experts from safetensors checkpoints, its time and peak RSS (sampled
with psutil), against a process that loads all 9 models with `from_pretrained` at once. The same checkpoints
also feed the size section's merges."""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionModel

from benchmarks import size
from benchmarks.formatting import fmt_gib
from benchmarks.harness import load_average, measure_process
from benchmarks.settings import TARGETS, TASK_VECTOR_STD, Check, GiB
from benchmarks.variants import base_config, expert_names

DENSE = "WEMoE dense, float32"

# Loads every checkpoint and reads every weight (safetensors may map files lazily; reading makes them resident).
LOAD_ALL = """
import sys
import torch
from transformers import CLIPVisionModel
models = [CLIPVisionModel.from_pretrained(path) for path in sys.argv[1:]]
with torch.no_grad():
    print(sum(float(p.sum()) for m in models for p in m.parameters()))
"""


def save_checkpoints(shape: str, folder: Path) -> tuple[Path, dict[str, Path]]:
    """A random base CLIPVisionModel and 8 experts (base + noise) as safetensors checkpoints."""
    config = base_config(shape)
    torch.manual_seed(0)
    base = CLIPVisionModel(config)
    base_dir = folder / "base"
    base.save_pretrained(base_dir)
    generator = torch.Generator().manual_seed(1)
    experts = {}
    state = base.state_dict()
    for name in expert_names():
        with torch.no_grad():
            expert_state = {
                k: v + TASK_VECTOR_STD * torch.randn(v.shape, generator=generator) for k, v in state.items()
            }
        expert = CLIPVisionModel(config)
        expert.load_state_dict(expert_state)
        experts[name] = folder / name
        expert.save_pretrained(experts[name])
        del expert, expert_state
    del base, state
    gc.collect()
    return base_dir, experts


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    """Total size of the files ending in `suffix` under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob(f"*{suffix}"))


def merge_command(base: Path, experts: dict[str, Path], output: Path, *extra: str) -> list[str]:
    """The `hf-wemoe merge` command line (the installed command, else `python -m hf_wemoe`)."""
    executable = shutil.which("hf-wemoe")
    command = [executable] if executable else [sys.executable, "-m", "hf_wemoe"]
    command += ["merge", "--base", str(base), "--output", str(output), "--quiet", "--overwrite", *extra]
    for name, path in experts.items():
        command += ["--expert", f"{name}={path}"]
    return command


def measure(args: argparse.Namespace, sections: set[str]) -> dict[str, Any]:
    """Write the 9 checkpoints, then time the dense float32 merge (and, with the size section, its other
    outputs) and, with the merge section, loading all 9 models at once."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hf-wemoe-bench-") as tmp:
        folder = Path(tmp)
        print(f"[merge] writing 9 checkpoints to {folder} ...", file=sys.stderr, flush=True)
        base, experts = save_checkpoints(args.shape, folder / "checkpoints")
        result["input_bytes"] = folder_bytes(folder / "checkpoints")
        variants = {DENSE: ("wemoe", "float32")}
        if "size" in sections:
            variants.update(size.OUTPUTS)
        result["merges"] = {}
        for name, (method, dtype) in variants.items():
            output = folder / "out" / name.replace(" ", "_").replace(",", "").replace("%", "")
            print(f"[merge] {name} (load {load_average()})", file=sys.stderr, flush=True)
            command = merge_command(base, experts, output, "--method", method, "--dtype", dtype)
            outcome = measure_process(command, timeout=3600)
            outcome["output_bytes"] = folder_bytes(output) if output.exists() else None
            outcome["load"] = load_average()
            result["merges"][name] = outcome
            print(f"  {outcome}", file=sys.stderr, flush=True)
            shutil.rmtree(output, ignore_errors=True)
        if "merge" in sections:
            print(
                f"[merge] loading all 9 models at once (load {load_average()})", file=sys.stderr, flush=True
            )
            paths = [str(base), *map(str, experts.values())]
            result["load_all"] = measure_process([sys.executable, "-c", LOAD_ALL, *paths], timeout=3600)
            print(f"  {result['load_all']}", file=sys.stderr, flush=True)
        result["merge_command"] = " ".join(
            merge_command(Path("<base>"), {"<name>": Path("<expert>")}, Path("<out>"))[1:]
        )
    return result


def summary(args: argparse.Namespace, merge: dict[str, Any]) -> dict[str, Any]:
    """What the report's merge section shows: the inputs' size, every merge, and loading all inputs at once."""
    load_all = merge.get("load_all")
    return {
        "shape": args.shape,
        "input_bytes": merge["input_bytes"],
        "merges": list(merge["merges"].items()),
        "load_all": load_all if load_all and "error" not in load_all else None,
    }


def checks(args: argparse.Namespace, merge: dict[str, Any]) -> list[Check]:
    """The dense merge's peak memory over its output size."""
    dense = merge["merges"].get(DENSE, {})
    if not (dense.get("peak_rss") and dense.get("output_bytes")):
        return []
    overhead = dense["peak_rss"] - dense["output_bytes"]
    return [
        Check(
            f"merge peak RSS <= output size + {TARGETS['merge_overhead_gib']:g} GB",
            f"{fmt_gib(dense['peak_rss'])} = output {fmt_gib(dense['output_bytes'])} + {fmt_gib(overhead)}",
            overhead <= TARGETS["merge_overhead_gib"] * GiB,
            "merge",
        )
    ]


def notes(args: argparse.Namespace) -> dict[str, str]:
    """Why the merge needs little more memory than its output."""
    return {
        "merge": (
            "`hf-wemoe merge` streams one tensor of every checkpoint at a time from safetensors and writes the output "
            "as it goes, so its peak is the output plus a small working set; loading the 9 inputs alone takes more."
        ),
    }
