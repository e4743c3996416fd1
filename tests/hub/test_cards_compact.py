"""Model cards of compact WEMoE models: routed modules and low-rank storage, also for models built in Python."""

from __future__ import annotations

from hf_wemoe import build_wemoe
from hf_wemoe.hub.cards import model_card
from tiny_models import make_base_and_experts


def test_a_python_built_low_rank_model_states_its_modules_and_rank(tmp_path):
    base, experts = make_base_and_experts(num_experts=2, seed=0)
    model = build_wemoe(base, experts, rank=4, moe_modules=["fc1", "q_proj"])
    model.save_pretrained(tmp_path / "model")
    text = model_card(tmp_path / "model").text
    assert "| routed modules | `q_proj`, `fc1` |" in text
    assert "Every weight outside the routed linear layers (`q_proj`, `fc1`) is merged by task arithmetic" in text
    assert "| task vectors | low rank 4 (τk ≈ Bk·Ak), `float32` |" in text
    # No merge recorded the kept energies: no section about them.
    assert "### Low-rank task vectors" not in text
