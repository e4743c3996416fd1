"""The command line of `scripts/benchmark.py`: options, the sections to run, the report and the raw JSON."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import forward, lowrank, merge, train
from benchmarks.harness import load_average, machine_info
from benchmarks.report import render
from benchmarks.settings import SHAPES

SECTIONS = ("forward", "train", "merge", "size", "lowrank")

# What `--worker KIND --spec JSON` runs in a fresh process.
WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"train": train.worker}


def parse_args(argv: list[str], description: str | None = None) -> argparse.Namespace:
    """The options; `--quick` and `--smoke` replace the batch sizes and repeats (and `--smoke` the shape)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="B/32", help="CLIP vision shape (default: B/32)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--sections",
        default="forward,train,merge,size,lowrank",
        help="comma-separated subset of forward,train,merge,size,lowrank",
    )
    parser.add_argument(
        "--ranks",
        type=lambda text: [int(r) for r in text.split(",")],
        default=[8, 16, 32, 64],
        help="ranks of the low-rank section, comma-separated (default: 8,16,32,64)",
    )
    parser.add_argument(
        "--lowrank-batches",
        type=int,
        nargs="+",
        default=[1, 16, 128],
        help="forward batch sizes of the low-rank section (default: 1 16 128)",
    )
    parser.add_argument("--output", default="BENCHMARKS.md", help="report file (default: BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this JSON file")
    parser.add_argument("--batches", type=int, nargs=2, default=[16, 128], help="forward batch sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per variant, small batch")
    parser.add_argument(
        "--repeats-large", type=int, default=3, help="timed forwards per variant, large batch"
    )
    parser.add_argument(
        "--fusionbench-repeats", type=int, default=3, help="FusionBench forwards, small batch"
    )
    parser.add_argument(
        "--fusionbench-repeats-large", type=int, default=1, help="FusionBench forwards, large batch"
    )
    parser.add_argument(
        "--train-batch", type=int, default=128, help="images per training step (8 tasks x 16)"
    )
    parser.add_argument(
        "--train-batch-small",
        type=int,
        default=2,
        help="images per step for the FusionBench comparison (its per-sample training keeps about 3 GB per image)",
    )
    parser.add_argument(
        "--train-steps", type=int, default=1, help="timed steps at --train-batch (no warm-up)"
    )
    parser.add_argument(
        "--train-steps-small",
        type=int,
        default=2,
        help="timed steps at --train-batch-small (after a warm-up)",
    )
    parser.add_argument(
        "--cpu-time-repeats",
        type=int,
        default=3,
        help="single-thread CPU-time forwards per variant at the small batch (0: skip)",
    )
    parser.add_argument("--no-fusionbench", action="store_true", help="skip the FusionBench comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, one repeat")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="--quick at a tiny non-CLIP shape: checks the harness (workers, merges, report), not the speed",
    )
    parser.add_argument(
        "--report-from", metavar="JSON", help="only re-render the report from a --json file of an earlier run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick or args.smoke:
        args.batches, args.repeats, args.repeats_large = [2, 4], 1, 1
        args.lowrank_batches = [1, 2, 4]
        args.fusionbench_repeats = args.fusionbench_repeats_large = args.cpu_time_repeats = 1
        args.train_batch, args.train_batch_small, args.train_steps, args.train_steps_small = 8, 2, 1, 1
    if args.smoke:
        args.shape = "tiny"
        args.ranks = [4, 16]
    return args


def _restore_keys(results: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the integer batch sizes of the forward results into strings: turn them back."""
    forward_results = results.get("forward")
    if forward_results:
        forward_results["batches"] = {int(b): entry for b, entry in forward_results["batches"].items()}
    lowrank_results = results.get("lowrank")
    if lowrank_results:
        lowrank_results["forward"] = {int(b): entry for b, entry in lowrank_results["forward"].items()}
    return results


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """Run the benchmark (or one worker, or only re-render a report) and write the report; the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv, description)
    torch.set_num_threads(args.threads)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print(json.dumps(result))
        return 0
    if args.report_from:
        # Re-render the report from saved measurements (e.g. after editing the notes), measuring nothing.
        saved = json.loads(Path(args.report_from).read_text())
        output, args = args.output, parse_args(saved.get("argv", []))
        args.output = output
        results = _restore_keys(saved["results"])
        text = render(args, saved["info"], results, saved["started"], saved.get("elapsed", 0.0))
        Path(args.output).write_text(text)
        print(text)
        return 0
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    device = torch.device(args.device)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    start = time.perf_counter()
    info = machine_info(args.threads, args.device)
    results: dict[str, Any] = {"load_start": load_average()}
    if "forward" in sections:
        results["forward"] = forward.measure(args, device)
        gc.collect()
    if "train" in sections:
        results["train"] = train.measure(args)
    if sections & {"merge", "size"}:
        results["merge"] = merge.measure(args, sections)
    if "lowrank" in sections:
        results["lowrank"] = lowrank.measure(args, device)
    elapsed = time.perf_counter() - start
    text = render(args, info, results, started, elapsed)
    Path(args.output).write_text(text)
    if args.json:
        saved = {"info": info, "results": results, "started": started, "elapsed": elapsed, "argv": args.argv}
        Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
    print(text)
    return 0
