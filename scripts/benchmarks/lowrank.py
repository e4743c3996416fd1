"""Low-rank section: WEMoE with rank-R task vectors (`hf-wemoe merge --rank R`) at several ranks against the static
model, in the same run: forward time at three batch sizes (per-sample and batch routing, round-robin in this
process), one router-training step (time and peak RSS, each rank in a fresh worker process), and saved size and
stored parameters relative to one backbone."""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.formatting import fmt_gib
from benchmarks.harness import load_average, round_robin, run_worker, single_thread_cpu_times
from benchmarks.settings import LAMBDA, NUM_EXPERTS, SHAPES, TARGETS, Check
from benchmarks.variants import make_low_rank, pixel_values, routing_mode
from hf_wemoe.io.weights import count_parameters, folder_size

STATIC = "static CLIPVisionModel"


def per_sample_name(rank: int) -> str:
    return f"rank {rank} per-sample"


def batch_name(rank: int) -> str:
    return f"rank {rank} batch routing"


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward times, training steps and sizes of every rank in `args.ranks`."""
    print(f"[lowrank] building models ({args.shape}, ranks {args.ranks}) ...", file=sys.stderr, flush=True)
    models = {rank: make_low_rank(args.shape, rank).to(device) for rank in args.ranks}
    static = models[args.ranks[0]].collapse(torch.full((NUM_EXPERTS,), LAMBDA)).eval().to(device)
    result: dict[str, Any] = {"ranks": list(args.ranks), "forward": {}, "sizes": {}, "train": []}

    with tempfile.TemporaryDirectory() as tmp:
        static.save_pretrained(Path(tmp) / "static")
        result["sizes"][STATIC] = {
            "bytes": folder_size(Path(tmp) / "static"),
            "parameters": count_parameters(Path(tmp) / "static")["total"],
        }
        for rank, model in models.items():
            folder = Path(tmp) / f"rank-{rank}"
            model.save_pretrained(folder)
            result["sizes"][per_sample_name(rank)] = {
                "bytes": folder_size(folder),
                "parameters": count_parameters(folder)["total"],
            }

    for batch in args.lowrank_batches:
        x = pixel_values(args.shape, batch).to(device)
        variants = {STATIC: lambda x=x, static=static: static(x)}
        for rank, model in models.items():
            variants[per_sample_name(rank)] = lambda x=x, model=model: model(x)

            def batch_routing(x=x, model=model):
                with routing_mode(model, "batch"):
                    return model(x)

            variants[batch_name(rank)] = batch_routing
        repeats = args.repeats if batch <= args.batches[0] else args.repeats_large
        print(f"[lowrank] batch {batch} (load {load_average()})", file=sys.stderr, flush=True)
        entry: dict[str, Any] = {"load_before": load_average()}
        entry["times"] = round_robin(variants, dict.fromkeys(variants, repeats), device)
        entry["load_after"] = load_average()
        if batch == args.batches[0] and device.type == "cpu" and args.cpu_time_repeats > 0:
            print("[lowrank] single-thread CPU time", file=sys.stderr, flush=True)
            entry["cpu_times"] = single_thread_cpu_times(variants, args.cpu_time_repeats)
        result["forward"][batch] = entry
        del x
        gc.collect()
    del models, static
    gc.collect()

    for rank in args.ranks:
        spec = dict(
            shape=args.shape,
            variant="sample",
            rank=rank,
            batch=args.train_batch,
            steps=args.train_steps,
            warmup=0,
            threads=args.threads,
            device=args.device,
        )
        load = load_average()
        print(f"[lowrank] training step, rank {rank} (load {load})", file=sys.stderr, flush=True)
        outcome = run_worker("train", spec, timeout=3600)
        result["train"].append({"name": per_sample_name(rank), "batch": args.train_batch, "load": load, **outcome})
    return result


def _medians(lowrank: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {
        b: {n: statistics.median(t) for n, t in entry["times"].items() if t}
        for b, entry in lowrank["forward"].items()
    }


def summary(args: argparse.Namespace, lowrank: dict[str, Any]) -> dict[str, Any]:
    """What the report's low-rank section shows: one row per variant (times and ratios per batch) and one per
    rank (training step, size, parameters)."""
    medians = _medians(lowrank)
    batches = sorted(medians)
    forward_rows = []
    for name in lowrank["forward"][batches[0]]["times"]:
        cells = []
        for b in batches:
            entry = lowrank["forward"][b]
            cells.append({"times": entry["times"][name], "ratio": medians[b][name] / medians[b][STATIC]})
        forward_rows.append({"name": name, "cells": cells})
    cpu_rows = None
    small = lowrank["forward"].get(args.batches[0])
    if small and small.get("cpu_times"):
        cpu = small["cpu_times"]
        cpu_medians = {n: statistics.median(t) for n, t in cpu.items() if t}
        cpu_rows = [(name, times, cpu_medians[name] / cpu_medians[STATIC]) for name, times in cpu.items()]
    backbone = lowrank["sizes"][STATIC]
    train_by_name = {run["name"]: run for run in lowrank["train"]}
    rank_rows = []
    for rank in lowrank["ranks"]:
        size = lowrank["sizes"][per_sample_name(rank)]
        rank_rows.append(
            {
                "rank": rank,
                "bytes": size["bytes"],
                "parameters": size["parameters"],
                "parameter_ratio": size["parameters"] / backbone["parameters"],
                "size_ratio": size["bytes"] / backbone["bytes"],
                "train": train_by_name.get(per_sample_name(rank), {}),
            }
        )
    return {
        "batches": batches,
        "forward_rows": forward_rows,
        "cpu_rows": cpu_rows,
        "small": args.batches[0],
        "train_batch": args.train_batch,
        "backbone": backbone,
        "rank_rows": rank_rows,
    }


def checks(args: argparse.Namespace, lowrank: dict[str, Any]) -> list[Check]:
    """The issue's targets at rank 16 (where it ran): per-sample forward and stored parameters."""
    rank = TARGETS["low_rank_rank"]
    if rank not in lowrank["ranks"]:
        return []
    medians = _medians(lowrank)
    small = args.batches[0]
    result = []
    if small in medians:
        ratio = medians[small][per_sample_name(rank)] / medians[small][STATIC]
        cpu = lowrank["forward"][small].get("cpu_times", {})
        detail = ""
        if cpu.get(per_sample_name(rank)):
            cpu_ratio = statistics.median(cpu[per_sample_name(rank)]) / statistics.median(cpu[STATIC])
            detail = f" (1-thread CPU time {cpu_ratio:.2f}x)"
        result.append(
            Check(
                f"rank-{rank} per-sample forward <= {TARGETS['low_rank_vs_static']}x static at batch {small}",
                f"{ratio:.2f}x{detail}",
                ratio <= TARGETS["low_rank_vs_static"],
                "low_rank",
            )
        )
    size = lowrank["sizes"][per_sample_name(rank)]
    backbone = lowrank["sizes"][STATIC]
    ratio = size["parameters"] / backbone["parameters"]
    result.append(
        Check(
            f"rank-{rank} WEMoE stores <= {TARGETS['low_rank_parameters']}x the backbone's parameters",
            f"{ratio:.2f}x ({size['parameters'] / 1e6:.1f}M vs {backbone['parameters'] / 1e6:.1f}M; "
            f"{fmt_gib(size['bytes'])} on disk)",
            ratio <= TARGETS["low_rank_parameters"],
            "low_rank",
        )
    )
    return result


def notes(args: argparse.Namespace) -> dict[str, str]:
    """How the low-rank path runs and what its cost is made of."""
    dims = SHAPES[args.shape]
    hidden, intermediate = dims["hidden_size"], dims["intermediate_size"]
    rank = TARGETS["low_rank_rank"]
    inner = NUM_EXPERTS * rank
    # Extra multiply-adds per token of one routed linear over the static one, as a share of the MLP's.
    extra = inner * (hidden + intermediate) / (hidden * intermediate)
    router = hidden * hidden / (2 * hidden * intermediate)
    # Stored parameters of the paper's depth-2 routers against the backbone's (roughly: every linear weight).
    layers = dims["num_hidden_layers"]
    routers = layers * (hidden * hidden + hidden + hidden * NUM_EXPERTS + NUM_EXPERTS)
    backbone = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return {
        "low_rank": (
            "How low-rank routing runs: a routed linear computes x W0^T + b0 + sum_k r_k ((x A_k^T) B_k^T) + "
            "sum_k r_k beta_k as two GEMMs over every token of the batch with inner dimension K*R, the (tokens, K*R) "
            "intermediate scaled per sample in between; no per-sample weights exist, and plain autograd keeps only "
            "that small intermediate for backward. At rank "
            f"{rank} (K*R = {inner}) the two GEMMs add {extra:.0%} of the MLP's multiply-adds per token, and the "
            f"paper's depth-2 router (a {hidden} x {hidden} layer on every token) another {router:.0%}; attention "
            "and everything else are unchanged, so per-sample and batch routing cost the same and the cost does "
            "not grow with the batch. Stored parameters: W0 and every non-MLP weight once, K*R*(in + out) per "
            f"routed weight, the bias task vectors and the routers (at ViT-{args.shape} the routers alone are about "
            f"{routers / backbone:.2f}x the backbone's linear weights). Factors here are random (speed and size do not depend on the values)."
        ),
    }


__all__ = ["checks", "measure", "notes", "summary"]
