"""The model API: folders saved by older releases, routing modes, router parameters, checkpointing, compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = ("legacy_wemoe", "legacy_ewemoe")


# ----------------------------------------------------------------------------------------------------------------
# Folders saved by the phase-1 release (see fixtures/make_legacy_models.py) load and compute the same bits.


@pytest.fixture(scope="module")
def legacy_outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "legacy_outputs.safetensors")


def _assert_legacy_outputs(model, name: str, expected: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        outputs = model(expected["pixel_values"], output_routing_weights=True)
    assert torch.equal(outputs.pooler_output, expected[f"{name}.pooler_output"])
    assert torch.equal(outputs.last_hidden_state, expected[f"{name}.last_hidden_state"])
    assert torch.equal(torch.stack(outputs.routing_weights), expected[f"{name}.routing_weights"])


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_folder_loads_bit_identically(name, legacy_outputs):
    model = WEMoECLIPVisionModel.from_pretrained(FIXTURES / name).eval()
    _assert_legacy_outputs(model, name, legacy_outputs)


def test_legacy_folders_load_with_their_own_remote_code(tmp_path):
    """In a fresh process where hf_wemoe cannot be imported, the folders' own (old) model files give the bits."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "hf_wemoe" or name.startswith("hf_wemoe."):
                    raise ImportError("hf_wemoe is blocked in this process")

        sys.meta_path.insert(0, Block())
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel

        expected = load_file({str(FIXTURES / "legacy_outputs.safetensors")!r})
        for name in {LEGACY!r}:
            model = AutoModel.from_pretrained({str(FIXTURES)!r} + "/" + name, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                outputs = model(expected["pixel_values"], output_routing_weights=True)
            assert torch.equal(outputs.pooler_output, expected[name + ".pooler_output"]), name
            assert torch.equal(outputs.last_hidden_state, expected[name + ".last_hidden_state"]), name
            assert torch.equal(torch.stack(outputs.routing_weights), expected[name + ".routing_weights"]), name
            print("REMOTE-OK", name)
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"REMOTE-OK {name}" in result.stdout for name in LEGACY)


# ----------------------------------------------------------------------------------------------------------------
# Importing a model module first thing in a process works (the Auto-class registration runs as transformers loads).


@pytest.mark.parametrize("module", ["configuration_wemoe", "modeling_wemoe", "modeling_wemoe_clip"])
def test_model_module_imports_first_in_a_fresh_process(module):
    script = textwrap.dedent(
        f"""
        import hf_wemoe.models.{module}
        from transformers import AutoConfig, AutoModel
        from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel

        config = AutoConfig.for_model("wemoe_clip_vision_model", expert_names=["a"])
        assert type(AutoModel.from_config(config)) is WEMoECLIPVisionModel
        print("IMPORT-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT-OK" in result.stdout
