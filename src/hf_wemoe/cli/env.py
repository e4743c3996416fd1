"""``hf-wemoe env``: versions, devices and cache locations, to paste into a bug report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.cli.options import add_options, resolve_options
from hf_wemoe.version import __version__

DESCRIPTION = """\
Print what a bug report needs: the versions of hf-wemoe, Python and the libraries it uses, the devices torch
sees, the cache folders (zero-shot heads, toy zoo, Hub downloads, datasets) and the environment variables that
change behaviour. A token is reported as set or not, never shown.
"""

EXAMPLES = """\
examples:
  hf-wemoe env
  hf-wemoe env --json > env.json
"""

# Libraries whose versions matter for a report (optional ones say "not installed").
PACKAGES = (
    "torch",
    "transformers",
    "huggingface_hub",
    "accelerate",
    "datasets",
    "safetensors",
    "evaluate",
    "pydantic",
    "numpy",
    "Pillow",
    "peft",
)
# Environment variables that change what the package does; values are shown, except for tokens.
VARIABLES = (
    "HF_WEMOE_CACHE",
    "HF_HOME",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "ACCELERATE_USE_CPU",
    "WORLD_SIZE",
    "CUDA_VISIBLE_DEVICES",
)
SECRET_VARIABLES = ("HF_TOKEN",)


class EnvOptions(BaseModel):
    """`hf-wemoe env` options."""

    model_config = ConfigDict(extra="forbid")

    as_json: bool = Field(
        False, description="print the report as one JSON object", json_schema_extra={"flag": "--json"}
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, [EnvOptions])


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict[str, Any]:
    # Imported here, not at the top: `hf-wemoe --help` and `hf-wemoe env --help` must not load torch.
    import torch

    devices: dict[str, Any] = {"cpu cores": os.cpu_count()}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        devices["cuda"] = f"{len(names)} x {', '.join(dict.fromkeys(names))} (CUDA {torch.version.cuda})"
    else:
        devices["cuda"] = "not available"
    mps = getattr(torch.backends, "mps", None)
    devices["mps"] = "available" if mps is not None and mps.is_available() else "not available"
    return devices


def _caches() -> dict[str, str]:
    # Imported here, not at the top: only a run of the command needs them.
    from huggingface_hub import constants

    from hf_wemoe.toy.manifest import default_zoo_dir
    from hf_wemoe.zeroshot.heads import heads_cache_dir

    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    return {
        "zero-shot heads": str(heads_cache_dir()),
        "toy zoo": str(default_zoo_dir().parent),
        "hub downloads": str(constants.HF_HUB_CACHE),
        "datasets": str(datasets_cache),
    }


def environment_report() -> dict[str, Any]:
    """The report as nested mappings: versions, devices, caches and environment variables."""
    from huggingface_hub import get_token

    environment: dict[str, Any] = {name: os.environ[name] for name in VARIABLES if name in os.environ}
    for name in SECRET_VARIABLES:
        environment[name] = "set" if os.environ.get(name) else "not set"
    environment["Hub token"] = "found" if get_token() else "not found"
    return {
        "hf-wemoe": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {package: _version(package) for package in PACKAGES},
        "devices": _devices(),
        "caches": _caches(),
        "environment": environment,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a markdown list (what a GitHub issue shows well)."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"- {key}:")
            lines.extend(f"  - {name}: {item}" for name, item in value.items())
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    (options,) = resolve_options(args, EnvOptions)
    report = environment_report()
    print(json.dumps(report, indent=2) if options.as_json else format_report(report))
    return 0
