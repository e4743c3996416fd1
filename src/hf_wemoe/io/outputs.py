"""Output folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hf_wemoe.errors import WEMoEError


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output (unless `overwrite`) before any expensive work starts."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise WEMoEError(
            f"output {path} already exists; pass --overwrite to replace it or choose another folder"
        )
    if path.exists() and not path.is_dir():
        raise WEMoEError(f"output {path} exists and is not a folder")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file that cannot be written (a folder, under a file, in a read-only folder) before any
    expensive work starts."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WEMoEError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'eval_results.json'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise WEMoEError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WEMoEError(f"{flag} {path} cannot be written (no permission); choose another path")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on any error it is deleted.

    Nothing is left at `path` by a failed run, and an existing folder is only replaced once the new one is
    complete.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(staging, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
