"""BENCHMARKS.md: every section's results turned into rows and targets, rendered from `report.md.j2`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jinja2

from benchmarks import forward, lowrank, merge, size, train
from benchmarks.formatting import fmt_gib, fmt_seconds, fmt_status
from benchmarks.harness import load_average
from benchmarks.settings import NUM_EXPERTS, Check, GiB

TEMPLATE = Path(__file__).resolve().with_name("report.md.j2")

# Notes shown whatever the outcome; the others only explain a missed target.
ALWAYS_NOTE = {"per_sample", "batch", "train", "merge", "low_rank"}

GENERAL_NOTES = [
    "The machine is shared: other jobs ran during the measurements (see the load averages). Variants are "
    "interleaved so that load affects them alike, but absolute times, and ratios of variants made of many small "
    "operations (per-sample routing) against ones made of a few large GEMMs (static), degrade under load: a "
    "two-thread parallel region waits for whichever of its threads was descheduled.",
    "Correctness of every fast path is tested against a float64 per-sample reference in `tests/test_fast_paths.py` "
    "and against the per-sample model reference in `tests/test_modeling.py`; nothing here is asserted in tests.",
]


def shown_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that shape the measurements (not where the results were written)."""
    shown, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--json", "--output"):
            skip = True
        elif not argument.startswith(("--json=", "--output=")):
            shown.append(argument)
    return shown


def checks(args: argparse.Namespace, results: dict[str, Any]) -> list[Check]:
    """The targets of every section that ran, in report order."""
    found: list[Check] = []
    if results.get("forward"):
        found += forward.checks(args, results["forward"])
    if results.get("train"):
        found += train.checks(args, results["train"])
    if results.get("merge"):
        found += merge.checks(args, results["merge"]) + size.checks(args, results["merge"])
    if results.get("lowrank"):
        found += lowrank.checks(args, results["lowrank"])
    return found


def notes(args: argparse.Namespace, found: list[Check]) -> list[str]:
    """The notes for the targets (each once; for a met target only where it is in `ALWAYS_NOTE`), then the
    general ones."""
    texts = {
        **forward.notes(args),
        **train.notes(args),
        **merge.notes(args),
        **size.notes(args),
        **lowrank.notes(args),
    }
    shown: dict[str, str] = {}
    for check in found:
        note = texts.get(check.note)
        if note and (not check.ok or check.note in ALWAYS_NOTE) and check.note not in shown:
            shown[check.note] = note
    return [*shown.values(), *GENERAL_NOTES]


def environment() -> jinja2.Environment:
    """The template environment: line-oriented block tags, the report's number formats as filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters.update(seconds=fmt_seconds, gib=fmt_gib, status=fmt_status)
    return env


def render(
    args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any], started: str, elapsed: float
) -> str:
    """The report's Markdown for the measurements `results` of a run started at `started`, `elapsed` seconds
    long, on the machine `info`."""
    found = checks(args, results)
    context = {
        "command": " ".join(["python", "scripts/benchmark.py", *shown_arguments(args.argv)]),
        "shape": args.shape,
        "num_experts": NUM_EXPERTS,
        "info": info,
        "GiB": GiB,
        "started": started,
        "elapsed": elapsed,
        "load_start": results["load_start"],
        "load_end": load_average(),
        "forward": forward.summary(args, results["forward"]) if results.get("forward") else None,
        "train": train.summary(args, results["train"]) if results.get("train") else None,
        "merge": merge.summary(args, results["merge"]) if results.get("merge") else None,
        "lowrank": lowrank.summary(args, results["lowrank"]) if results.get("lowrank") else None,
        "checks": found,
        "notes": notes(args, found),
    }
    return environment().get_template(TEMPLATE.name).render(context)
