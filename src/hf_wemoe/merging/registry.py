"""Merge methods: a small class per method and a registry mapping method names to classes.

A method declares its name, a one-line summary, the options it reads, its own defaults for options whose
default depends on the method, and how it writes its output folder. Nothing else in the package branches on
method names: the command line, the options and the model card all ask the registry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import WEMoEError

if TYPE_CHECKING:
    from ..sources import ModelSource
    from .options import MergeOptions

# Modules that define (and register) merge methods, imported on first use of the registry.
_METHOD_MODULES = ("upscale", "static")
_REGISTRY: dict[str, type[MergeMethod]] = {}

# `progress(iterable, description, total)` wraps an iterable with a progress bar (or returns it unchanged).
Progress = Callable[[Iterable, str, int | None], Iterable]


def no_progress(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
    """A `Progress` that shows nothing."""
    return iterable


@dataclass
class MergeJob:
    """Everything a method needs to write a merged model: resolved options, opened sources, provenance."""

    options: MergeOptions
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
    """Names of the method options (fields of `MergeOptions`) this method reads."""
    defaults: ClassVar[dict[str, Any]] = {}
    """This method's values for options whose default depends on the method (their field default is None)."""
    card_template: ClassVar[str]
    """File name of the model card template in `hf_wemoe/model_cards/`."""
    tags: ClassVar[tuple[str, ...]] = ()
    """Extra Hub tags for the model card."""

    def __init__(self, options: MergeOptions):
        self.options = options

    @abstractmethod
    def write(self, job: MergeJob, folder: Path) -> None:
        """Write the merged model (config and weights) into the empty folder `folder`."""


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a merge method to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def merge_methods() -> dict[str, type[MergeMethod]]:
    """All registered merge methods, by name, in registration order."""
    for module in _METHOD_MODULES:
        importlib.import_module(f".{module}", __package__)
    return dict(_REGISTRY)


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered under `name`."""
    methods = merge_methods()
    if name not in methods:
        raise WEMoEError(f"unknown merge method '{name}'; choose one of: {', '.join(methods)}")
    return methods[name]


__all__ = ["MergeJob", "MergeMethod", "Progress", "get_method", "merge_methods", "no_progress", "register"]
