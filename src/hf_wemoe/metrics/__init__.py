"""``evaluate`` metrics shipped with hf-wemoe, loadable offline (no Hub download of the metric script)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ACCURACY_PATH", "load_accuracy"]

#: Folder of the top-1 accuracy metric script (``evaluate.load`` takes a folder holding ``<folder name>.py``).
ACCURACY_PATH = Path(__file__).resolve().parent / "accuracy"


def load_accuracy(**kwargs: Any) -> Any:
    """``evaluate.load`` of the packaged top-1 accuracy metric.

    Keyword arguments go to ``evaluate.load``: e.g. ``num_process``/``process_id``/``experiment_id`` to gather
    predictions from several processes (process 0 computes the result), or ``cache_dir``.
    """
    import evaluate

    return evaluate.load(str(ACCURACY_PATH), **kwargs)
