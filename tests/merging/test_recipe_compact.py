"""The recipe's compact-expert options: `rank` and `moe_modules` (flags, YAML, defaults, what is recorded)."""

from __future__ import annotations

import pytest

from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.recipe import MergeRecipe, parse_moe_modules

SOURCES = {"base": "org/base", "experts": {"a": "org/a", "b": "org/b"}}


def test_moe_modules_in_every_spelling_become_one_canonical_list():
    assert parse_moe_modules("v_proj, q_proj") == ["q_proj", "v_proj"]
    assert parse_moe_modules(["fc2,q_proj", "out_proj"]) == ["q_proj", "out_proj", "fc2"]
    recipe = MergeRecipe.from_values({**SOURCES, "moe_modules": "fc1,k_proj"})
    assert recipe.moe_modules == ["k_proj", "fc1"]
    for bad in ("", "fc3", "fc1,fc1", 7):
        with pytest.raises(ValueError):
            parse_moe_modules(bad)


def test_rank_replaces_sparsity():
    resolved = MergeRecipe.from_values({**SOURCES, "method": "e-wemoe", "rank": 8}).resolved()
    assert (resolved.rank, resolved.sparsity, resolved.shared_router) == (8, 0.0, True)
    # An explicit zero sparsity is no conflict; a positive one is.
    assert MergeRecipe.from_values({**SOURCES, "rank": 8, "sparsity": 0.0}).resolved().sparsity == 0.0
    with pytest.raises(WEMoEError, match="--rank 8 and --sparsity 0.5 are two ways"):
        MergeRecipe.from_values({**SOURCES, "rank": 8, "sparsity": 0.5}).resolved()
    # Without a rank the method defaults stay.
    assert MergeRecipe.from_values({**SOURCES, "method": "e-wemoe"}).resolved().sparsity == 0.9


def test_the_recipe_records_rank_and_modules_only_when_set():
    plain = MergeRecipe.from_values(SOURCES).resolved().to_yaml_dict()
    assert "rank" not in plain and "moe_modules" not in plain
    default_modules = (
        MergeRecipe.from_values({**SOURCES, "moe_modules": ["fc2", "fc1"]}).resolved().to_yaml_dict()
    )
    assert "moe_modules" not in default_modules
    compact = MergeRecipe.from_values({**SOURCES, "rank": 4, "moe_modules": "v_proj,q_proj"}).resolved()
    recorded = compact.to_yaml_dict()
    assert recorded["rank"] == 4 and recorded["moe_modules"] == ["q_proj", "v_proj"]
    # What is recorded reads back as the same recipe.
    assert MergeRecipe.from_values(recorded).resolved() == compact
