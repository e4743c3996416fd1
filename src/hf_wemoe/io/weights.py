"""Writing and inspecting safetensors checkpoints: a sharding writer and header-only tensor listings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_wemoe.errors import SourceError
from hf_wemoe.io.layout import SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME
from hf_wemoe.models.modeling_wemoe import is_router_parameter

# Key endings of the tensors that hold the positions of sparse task-vector entries.
SPARSE_POSITION_SUFFIXES = ("_indices", "_block_counts")


class ShardedSafetensorsWriter:
    """Writes tensors to `model.safetensors`, or to numbered shards plus an index when they exceed a size.

    Tensors are buffered until the next one would take the buffer past `max_shard_size`; the buffer is then
    written as one shard and dropped, so memory holds at most one shard. A tensor larger than the limit gets a
    shard of its own. Names follow transformers (`model-00001-of-00003.safetensors`, `model.safetensors.index.json`)
    so `from_pretrained` loads the folder.
    """

    def __init__(
        self, folder: str | os.PathLike, max_shard_size: int, metadata: dict[str, str] | None = None
    ):
        self.folder = Path(folder)
        self.max_shard_size = int(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes a shard when the buffer is full."""
        if key in self._buffer or any(key in keys for _, keys in self._shards):
            raise ValueError(f"tensor '{key}' written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self._flush()
        self._buffer[key] = tensor.detach().cpu().contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f"model-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index; returns the files."""
        self._flush()
        if len(self._shards) == 1:
            target = self.folder / SAFETENSORS_NAME
            os.replace(self._shards[0][0], target)
            return [target]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for number, (path, keys) in enumerate(self._shards, start=1):
            target = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, target)
            files.append(target)
            weight_map.update({key: target.name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        index_path = self.folder / SAFETENSORS_INDEX_NAME
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*files, index_path]


def first_non_finite(tensor: torch.Tensor) -> float | None:
    """The first NaN or infinite value of a floating-point tensor, or None when all are finite (or it is not float)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    return float(tensor.reshape(-1)[~finite.reshape(-1)][0])


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise `SourceError` naming `what` when a floating-point tensor holds NaN or infinite values.

    `hint` says what to do (default: the checkpoint is damaged, use another one).
    """
    bad = first_non_finite(tensor)
    if bad is not None:
        count = int((~torch.isfinite(tensor)).sum())
        hint = hint or "the checkpoint is damaged or its training diverged: use another one"
        raise SourceError(
            f"{what} has non-finite values ({count} of {tensor.numel()} are NaN or infinite, e.g. {bad}); {hint}"
        )


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a saved model folder (single file or the shards its index lists)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return [folder / SAFETENSORS_NAME] if (folder / SAFETENSORS_NAME).is_file() else []


def tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """`name -> (shape, safetensors dtype)` of every tensor in a saved model folder, read from file headers."""
    shapes = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shapes[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return shapes


def count_parameters(folder: str | os.PathLike) -> dict[str, int]:
    """Stored values of a saved model, by role: `total`, `router`, `task_vectors` and `other`.

    The position tensors of sparse task vectors (`*_indices`, `*_block_counts`, see `WEMoETaskVectors`) are
    not parameters and are not counted.
    """
    counts = {"total": 0, "router": 0, "task_vectors": 0, "other": 0}
    for key, (shape, _) in tensor_shapes(folder).items():
        if ".task_vectors." in key and key.endswith(SPARSE_POSITION_SUFFIXES):
            continue
        numel = math.prod(shape)
        role = "router" if is_router_parameter(key) else "task_vectors" if ".task_vectors." in key else "other"
        counts[role] += numel
        counts["total"] += numel
    return counts


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of every file in a folder (recursively)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


__all__ = [
    "ShardedSafetensorsWriter",
    "check_finite",
    "first_non_finite",
    "count_parameters",
    "folder_size",
    "tensor_shapes",
    "weight_files",
]
