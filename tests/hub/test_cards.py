"""Model cards: metadata the Hub accepts and reads back, and a body that says what the model is and how to use it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from clip_worlds import BASE, COMMITS, HUB_EXPERTS, adapt, as_if_from_the_hub, make_clip_world, merge
from hf_wemoe import build_wemoe
from hf_wemoe.errors import WEMoEError
from hf_wemoe.hub.cards import model_card, render_card, validate_card
from hub_server import _validate_card_metadata
from tiny_models import make_base_and_experts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    world = make_clip_world(root)
    return {
        "vision": merge(world, root / "vision"),
        "full": merge(world, root / "full", "--full-clip"),
        "static": merge(world, root / "static", "--method", "ties"),
        "static_full": merge(world, root / "static-full", "--method", "average", "--full-clip"),
    }


def test_wemoe_card_metadata_and_body(folders, tmp_path):
    folder = as_if_from_the_hub(folders["vision"], tmp_path / "hub")
    card = model_card(folder, model_id="testorg/wemoe-tiny")
    assert _validate_card_metadata(str(card)) == []
    data = ModelCard(str(card)).data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert data.base_model == [BASE, *HUB_EXPERTS.values()] and data.base_model_relation == "merge"
    assert data.license == "mit"  # inherited from the base's card
    assert {"hf-wemoe", "wemoe", "mixture-of-experts", "model-merging"} <= set(data.tags)
    assert data.eval_results is None and data.datasets is None
    text = card.text
    for expected in (
        "# testorg/wemoe-tiny",
        "λ = 0.3",
        "depth 2 (linear, ReLU, linear), one router per layer",
        *(
            f"[`{ref}`](https://huggingface.co/{ref}) | "
            f"[`{COMMITS[name][:12]}`](https://huggingface.co/{ref}/tree/{COMMITS[name]})"
            for name, ref in HUB_EXPERTS.items()
        ),
        f"(commit [`{COMMITS['base'][:12]}`](https://huggingface.co/{BASE}/tree/{COMMITS['base']}))",
        'AutoModel.from_pretrained("testorg/wemoe-tiny", trust_remote_code=True)',
        'pipeline("image-feature-extraction", model="testorg/wemoe-tiny", trust_remote_code=True)',
        "import hf_wemoe",
        "model.collapse([1.0, 0.0])",
        "this model routes with `sample`",
        "The routers are at their initial value",
        "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
        "International Conference on Machine Learning (ICML)",
        "2402.00433",
        "Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model Merging",
        "Shen, Li and Tang, Anke and Yang, Enneng and Guo, Guibing",
        "2410.21804",
        "hf-wemoe merge --config merge_config.yaml",
    ):
        assert expected in text, expected
    assert "## Results" not in text and "routing.png" not in text


def test_adapted_card_has_results_baselines_routing_plot_and_model_index(folders, tmp_path):
    folder = adapt(as_if_from_the_hub(folders["vision"], tmp_path / "adapted"))
    card = model_card(folder, model_id="testorg/wemoe-adapted")
    assert _validate_card_metadata(str(card)) == []
    loaded = ModelCard(str(card))
    assert loaded.data.to_dict() == card.data.to_dict()
    data = loaded.data
    assert data.model_name == "testorg/wemoe-adapted" and data.metrics == ["accuracy"]
    assert data.datasets == ["tanganke/dtd", "ufldl-stanford/svhn"]
    assert "test-time-adaptation" in data.tags
    results = {result.dataset_name: result for result in data.eval_results}
    assert set(results) == {"blocks", "stripes", "local"}
    assert results["blocks"].dataset_type == "tanganke/dtd" and results["blocks"].metric_value == 71.25
    assert (
        results["stripes"].dataset_config == "cropped_digits" and results["stripes"].dataset_split == "test"
    )
    assert results["local"].dataset_type == "local"
    assert all(
        r.task_type == "zero-shot-image-classification" and r.metric_type == "accuracy"
        for r in results.values()
    )
    text = card.text
    for expected in (
        "| this model | 71.2 | 95.5 | 50.0 | 72.2 |",
        "| before adaptation | 50.0 | 60.0 | 40.0 | 50.0 |",
        "measured in the same evaluation",
        "![Routing weights per layer and expert](routing.png)",
        "Only the routers were trained, for 1000 steps",
        "final loss 0.1235",
        "[`tanganke/dtd#test`](https://huggingface.co/datasets/tanganke/dtd)",
        "results on those tasks are transductive",
        "Examples per task: blocks 1880, stripes 26032, local 10.",
    ):
        assert expected in text, expected


def test_full_clip_card_has_the_zero_shot_widget(folders):
    card = model_card(folders["full"], model_id="testorg/wemoe-clip")
    assert _validate_card_metadata(str(card)) == []
    data = ModelCard(str(card)).data
    assert data.pipeline_tag == "zero-shot-image-classification" and data.license == "mit"
    (widget,) = data.widget
    assert widget["src"].startswith("https://") and widget["example_title"]
    assert len(widget["candidate_labels"].split(",")) >= 2
    for expected in (
        'pipeline("zero-shot-image-classification", model="testorg/wemoe-clip", trust_remote_code=True)',
        "AutoTokenizer.from_pretrained",
        "logits_per_image.softmax",
        "A plain CLIPModel for fixed routing weights",
    ):
        assert expected in card.text, expected


def test_static_merge_cards(folders):
    card = model_card(folders["static"], model_id="testorg/ties")
    assert _validate_card_metadata(str(card)) == []
    assert card.data.pipeline_tag == "image-feature-extraction" and "`ties`" in card.text
    assert "CLIPVisionModel.from_pretrained" in card.text and "trust_remote_code" not in card.text
    assert "| `ties_keep` | `0.2` |" in card.text
    full = model_card(folders["static_full"], model_id="testorg/avg-clip")
    assert full.data.pipeline_tag == "zero-shot-image-classification" and full.data.widget
    assert 'pipeline("zero-shot-image-classification", model="testorg/avg-clip")' in full.text
    assert "CLIPModel.from_pretrained" in full.text and "trust_remote_code" not in full.text


def test_card_of_a_model_built_in_python(tmp_path):
    """A model saved by `build_wemoe(...).save_pretrained` records no recipe: the card says so, lists no sources."""
    base, experts = make_base_and_experts(num_experts=2)
    build_wemoe(base, experts, shared_router=True, sparsity=0.5).save_pretrained(tmp_path)
    card = model_card(tmp_path, model_id="testorg/python")
    assert _validate_card_metadata(str(card)) == []
    assert card.data.base_model is None and "e-wemoe" in card.data.tags
    assert "`e-wemoe`" in card.text and "50% of every tensor kept" in card.text
    assert "one router shared by all layers" in card.text
    assert "| task0 | `not recorded` | `unknown` |" in card.text and "## Recipe" not in card.text


def test_card_of_a_folder_saved_with_the_old_field_names(tmp_path):
    """A config.json saved before `init_lambda` and `task_vector_sparsity` were renamed gives the same card."""
    folder = shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "legacy_ewemoe", tmp_path / "legacy")
    config = json.loads((folder / "config.json").read_text())
    assert config["init_lambda"] == 0.3 and config["task_vector_sparsity"] == 0.9 and "scaling" not in config
    card = model_card(folder, model_id="testorg/legacy")
    assert "`e-wemoe`" in card.text and "10% of every tensor kept by magnitude (sparsity 0.9)" in card.text
    assert "| λ (task-arithmetic scaling, router initialisation) | 0.3 |" in card.text


def test_card_errors(folders, tmp_path):
    with pytest.raises(WEMoEError, match="template 'missing.md' not found"):
        render_card("missing.md", {})
    with pytest.raises(WEMoEError, match="no metadata block"):
        validate_card("# no metadata")
    with pytest.raises(WEMoEError, match="invalid model card metadata"):
        validate_card("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(WEMoEError, match="cannot read config.json"):
        model_card(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WEMoEError, match="model_type 'bert'"):
        model_card(tmp_path)
