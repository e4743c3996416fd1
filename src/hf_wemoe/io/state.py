"""Nested training state (optimizer, scheduler, counters) as safetensors plus JSON: nothing is ever unpickled.

`torch.save`/`torch.load` checkpoints are pickle: loading one from an untrusted folder can run arbitrary code. Here
every tensor of a state goes to a safetensors file and everything else (numbers, strings, booleans, None, and the
structure of dicts, lists and tuples, with their key types) to JSON, so reading a state back only parses data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hf_wemoe.errors import WEMoEError

_SCALARS = (bool, int, float, str, type(None))


def encode_state(state: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """A JSON-ready description of `state`; its tensors are put into `tensors` under their path in the state."""
    if isinstance(state, torch.Tensor):
        tensors[path] = state.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(state, dict):
        items = []
        for key, value in state.items():
            if not isinstance(key, _SCALARS):
                raise TypeError(f"cannot store a state with a {type(key).__name__} key at {path}")
            items.append([key, encode_state(value, tensors, f"{path}.{key}")])
        return {"dict": items}
    if isinstance(state, (list, tuple)):
        kind = "list" if isinstance(state, list) else "tuple"
        return {kind: [encode_state(value, tensors, f"{path}.{i}") for i, value in enumerate(state)]}
    if isinstance(state, _SCALARS):
        if isinstance(state, float) and not math.isfinite(state):
            return {"float": repr(state)}  # JSON has no NaN or infinity
        return {"value": state}
    raise TypeError(f"cannot store a {type(state).__name__} in a training state (at {path})")


def decode_state(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state described by `encode_state`'s output; raises `ValueError` for anything else."""
    if not isinstance(encoded, dict) or len(encoded) != 1:
        raise ValueError(f"malformed state entry {str(encoded)[:80]!r}")
    ((kind, value),) = encoded.items()
    if kind == "tensor":
        if value not in tensors:
            raise ValueError(f"the state names tensor {value!r}, which the safetensors file lacks")
        return tensors[value]
    if kind == "dict":
        return {key: decode_state(item, tensors) for key, item in value}
    if kind in ("list", "tuple"):
        items = [decode_state(item, tensors) for item in value]
        return items if kind == "list" else tuple(items)
    if kind == "float" and value in ("nan", "inf", "-inf"):
        return float(value)
    if kind == "value" and isinstance(value, _SCALARS):
        return value
    raise ValueError(f"malformed state entry {str(encoded)[:80]!r}")


def read_json(path: Path) -> Any:
    """A JSON file (data only), or a one-line `WEMoEError`."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WEMoEError(f"cannot read {path}: {' '.join(str(err).split())}") from err


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a one-line `WEMoEError`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WEMoEError(f"cannot read {path}: {' '.join(str(err).split())}") from err


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file (shared storage is copied: safetensors refuses aliases)."""
    save_file({key: tensor.clone() for key, tensor in tensors.items()}, str(path))


__all__ = ["decode_state", "encode_state", "read_json", "read_tensors", "write_tensors"]
