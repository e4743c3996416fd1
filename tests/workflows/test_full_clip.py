"""`hf-wemoe merge --full-clip`: the base's text tower with the merged vision tower, for zero-shot pipelines."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModel, pipeline

from clip_worlds import EXPERTS, make_clip_world, merge, sample_image
from hf_wemoe import WEMoECLIPModel, WEMoECLIPVisionModel
from hf_wemoe.cli.main import main
from hf_wemoe.models.modeling_wemoe import is_router_parameter


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-clip")
    world = make_clip_world(root)
    return {
        **world,
        "full": merge(world, root / "full", "--full-clip"),
        "vision": merge(world, root / "vision"),
        "static_full": merge(world, root / "static-full", "--full-clip", "--method", "task-arithmetic"),
        "static": merge(world, root / "static", "--method", "task-arithmetic"),
        # Compact experts: low-rank task vectors, attention projections routed too.
        "low_rank_full": merge(world, root / "low-rank-full", "--full-clip", "--rank", "2", "--moe-modules", "q_proj,fc1"),
        "low_rank": merge(world, root / "low-rank", "--rank", "2", "--moe-modules", "q_proj,fc1"),
    }


def test_full_clip_folder(merged):
    full = merged["full"]
    files = {path.name for path in full.iterdir()}
    assert files == {
        "config.json",
        "model.safetensors",
        "configuration_wemoe.py",
        "modeling_wemoe.py",
        "modeling_wemoe_clip.py",
        "wemoe_ops.py",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "merge_config.yaml",
        "README.md",
    }
    for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "preprocessor_config.json"):
        assert (full / name).read_bytes() == (merged["clip"] / name).read_bytes(), name
    config = json.loads((full / "config.json").read_text())
    assert (
        config["model_type"] == "wemoe_clip"
        and config["vision_config"]["model_type"] == "wemoe_clip_vision_model"
    )
    assert config["auto_map"] == {
        "AutoConfig": "configuration_wemoe.WEMoECLIPConfig",
        "AutoModel": "modeling_wemoe_clip.WEMoECLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_wemoe_clip.WEMoECLIPModel",
    }
    provenance = config["vision_config"]["provenance"]
    assert list(provenance["experts"]) == list(EXPERTS) and provenance["base_license"] == {"license": "mit"}
    assert yaml.safe_load((full / "merge_config.yaml").read_text())["full_clip"] is True
    # The copied model code imports only its siblings, never the package.
    for name in ("modeling_wemoe_clip.py", "modeling_wemoe.py", "configuration_wemoe.py", "wemoe_ops.py"):
        assert "hf_wemoe" not in (full / name).read_text(), name


def test_full_clip_is_the_base_text_tower_with_the_merged_vision_tower(merged):
    full = WEMoECLIPModel.from_pretrained(merged["full"]).eval()
    vision = WEMoECLIPVisionModel.from_pretrained(merged["vision"]).eval()
    base = CLIPModel.from_pretrained(merged["clip"]).eval()
    for part, reference in ((full.vision_model, vision), (full.text_model, base.text_model)):
        expected = reference.state_dict()
        assert all(torch.equal(tensor, expected[key]) for key, tensor in part.state_dict().items())
    assert torch.equal(full.visual_projection.weight, base.visual_projection.weight)
    assert torch.equal(full.logit_scale, base.logit_scale)
    assert all(is_router_parameter(name) for name, p in full.named_parameters() if p.requires_grad)

    tokenizer = AutoTokenizer.from_pretrained(merged["full"])
    text = tokenizer(["a photo of red", "green"], padding=True, return_tensors="pt")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = full(pixel_values=pixels, **text, output_routing_weights=True)
        image = base.visual_projection(vision(pixels).pooler_output)
        words = base.text_projection(base.text_model(**text).pooler_output)
    image, words = image / image.norm(dim=-1, keepdim=True), words / words.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(outputs.logits_per_image, base.logit_scale.exp() * image @ words.t())
    assert len(outputs.routing_weights) == 2 and outputs.routing_weights[0].shape == (3, len(EXPERTS))

    # Collapsing gives a plain CLIPModel computing what forced routing computes.
    routing = torch.tensor([0.7, 0.1])
    with torch.no_grad():
        forced = full(pixel_values=pixels, **text, force_routing=routing).logits_per_image
        static = full.collapse(routing)(pixel_values=pixels, **text).logits_per_image
    torch.testing.assert_close(static, forced, rtol=1e-4, atol=1e-4)


def test_low_rank_full_clip_holds_the_low_rank_vision_tower(merged):
    full = WEMoECLIPModel.from_pretrained(merged["low_rank_full"]).eval()
    vision = WEMoECLIPVisionModel.from_pretrained(merged["low_rank"]).eval()
    config = full.config.vision_config
    assert config.rank == 2 and config.moe_modules == ["q_proj", "fc1"]
    expected = vision.state_dict()
    state = full.vision_model.state_dict()
    assert state.keys() == expected.keys() and any(key.endswith("q_proj_weight_A") for key in state)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in state.items())
    tokenizer = AutoTokenizer.from_pretrained(merged["low_rank_full"])
    text = tokenizer(["a photo of red", "green"], padding=True, return_tensors="pt")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    routing = torch.tensor([0.7, 0.1])
    with torch.no_grad():
        forced = full(pixel_values=pixels, **text, force_routing=routing).logits_per_image
        static = full.collapse(routing)(pixel_values=pixels, **text).logits_per_image
    torch.testing.assert_close(static, forced, rtol=1e-4, atol=1e-4)
    assert "rank" in (merged["low_rank_full"] / "README.md").read_text()


def test_zero_shot_pipeline_with_the_installed_package(merged):
    classifier = pipeline("zero-shot-image-classification", model=str(merged["full"]))
    assert type(classifier.model) is WEMoECLIPModel
    image, labels = sample_image(), ["red", "green", "blue"]
    predictions = classifier(image, candidate_labels=labels)
    assert sorted(p["label"] for p in predictions) == sorted(labels)
    # The same scores by hand: the pipeline's prompt, the folder's tokenizer and image processor.
    tokenizer = AutoTokenizer.from_pretrained(merged["full"])
    processor = CLIPImageProcessor.from_pretrained(merged["full"])
    text = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**text, **processor(images=[image], return_tensors="pt")).logits_per_image
    expected = dict(zip(labels, logits[0].softmax(dim=-1).tolist()))
    for prediction in predictions:
        assert prediction["score"] == pytest.approx(expected[prediction["label"]], abs=1e-6)


def test_static_full_clip_is_a_plain_clip_model(merged):
    model, info = CLIPModel.from_pretrained(merged["static_full"], output_loading_info=True)
    assert not any(info.values()), info
    assert not list(merged["static_full"].glob("*.py"))
    config = json.loads((merged["static_full"] / "config.json").read_text())
    assert config["model_type"] == "clip" and "auto_map" not in config
    vision = CLIPVisionModel.from_pretrained(merged["static"]).state_dict()
    assert all(torch.equal(tensor, vision[key]) for key, tensor in model.vision_model.state_dict().items())
    base = CLIPModel.from_pretrained(merged["clip"]).state_dict()
    assert all(
        torch.equal(tensor, base[key])
        for key, tensor in model.state_dict().items()
        if "vision_model" not in key
    )
    classifier = pipeline("zero-shot-image-classification", model=str(merged["static_full"]))
    assert len(classifier(sample_image(), candidate_labels=["a", "b"])) == 2


def test_full_clip_recipe_rebuilds_identical_weights(merged, tmp_path):
    recipe = merged["full"] / "merge_config.yaml"
    assert main(["merge", "-q", "--config", str(recipe), "--output", str(tmp_path / "again")]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (merged["full"] / name).read_bytes(), name


def test_full_clip_needs_a_full_clip_base(merged, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        ["merge", "-q", "--base", str(merged["blocks"]), "--expert", f"stripes={merged['stripes']}"]
        + ["--output", str(output), "--full-clip"]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --full-clip needs a full CLIP base") and "\n" not in error
    assert not output.exists() and list(tmp_path.iterdir()) == []
