"""The base of every merge method: what a method declares and what it is given to write a merged model.

A method declares its name, a one-line summary, the options it reads, its own defaults for options whose
default depends on the method, and how it writes its output folder. `hf_wemoe.merging.registry` maps names to
methods; nothing else in the package branches on method names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from hf_wemoe.io.sources import ModelSource

# What to do when a merged tensor is not finite: sources are checked when read, so the merge itself overflowed.
OVERFLOW_HINT = "the merge overflows the checkpoint's dtype: lower --scaling"

# `progress(iterable, description, total)` wraps an iterable with a progress bar (or returns it unchanged).
Progress = Callable[[Iterable, str, int | None], Iterable]


def no_progress(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
    """A `Progress` that shows nothing."""
    return iterable


@dataclass
class MergeJob:
    """Everything a method needs to write a merged model: resolved options, opened sources, provenance."""

    options: Any
    """The resolved `MergeRecipe` of the merge."""
    base: ModelSource
    experts: dict[str, ModelSource]
    provenance: dict[str, Any]
    progress: Progress = field(default=no_progress)

    def expert_tensors(self, key: str) -> Iterator[Any]:
        """Tensor `key` of every expert, read one at a time, in expert order."""
        for source in self.experts.values():
            yield source.get(key)


class MergeMethod(ABC):
    """A merge method: its name, its options, and how it writes the merged model into a folder."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line saying what the method computes (shown in `--help` and in the model card)."""
    parameters: ClassVar[tuple[str, ...]] = ()
    """Names of the method options (fields of `MergeRecipe`) this method reads."""
    defaults: ClassVar[dict[str, Any]] = {}
    """This method's values for options whose default depends on the method (their field default is None)."""
    card_template: ClassVar[str]
    """File name of the model card template in `model_cards/` (package `hf_wemoe.hub.model_cards`)."""
    tags: ClassVar[tuple[str, ...]] = ()
    """Extra Hub tags for the model card."""
    is_moe: ClassVar[bool] = False
    """True when the method writes a mixture-of-experts model with routers to adapt (WEMoE), False when it writes
    one static model."""

    def __init__(self, options: Any):
        self.options = options

    @abstractmethod
    def write(self, job: MergeJob, folder: Path) -> None:
        """Write the merged model (config and weights) into the empty folder `folder`."""


__all__ = ["OVERFLOW_HINT", "MergeJob", "MergeMethod", "Progress", "no_progress"]
