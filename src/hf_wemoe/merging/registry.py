"""The registry of merge methods: every method family's module adds its classes here under their names."""

from __future__ import annotations

from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.base import MergeMethod
from hf_wemoe.merging.static import Average, TaskArithmetic, Ties
from hf_wemoe.merging.wemoe import EWEMoE, WEMoE

# In the order `--help` and the model cards list them.
_METHODS: tuple[type[MergeMethod], ...] = (WEMoE, EWEMoE, TaskArithmetic, Average, Ties)


def merge_methods() -> dict[str, type[MergeMethod]]:
    """All merge methods, by name."""
    return {method.name: method for method in _METHODS}


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered under `name`."""
    methods = merge_methods()
    if name not in methods:
        raise WEMoEError(f"unknown merge method '{name}'; choose one of: {', '.join(methods)}")
    return methods[name]


__all__ = ["get_method", "merge_methods"]
