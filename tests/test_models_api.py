"""The model API: folders saved by older releases, routing modes, router parameters, checkpointing, compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
