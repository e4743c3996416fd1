"""Zero-shot heads: the math against a direct computation, the logit scale, and the disk cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.zeroshot import heads as heads_module
from hf_wemoe.zeroshot.heads import (
    ZeroShotHead,
    build_zeroshot_head,
    heads_cache_dir,
    load_or_build_head,
    load_or_build_heads,
    model_identity,
)
from tiny_clip import make_tiny_clip

CLASSNAMES = ["cat", "dog", "stop sign", "annual crop land"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}!", 'a "{}" sign.']


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)


def _reference_weight(model, tokenizer, classnames, templates):
    """One prompt at a time, through CLIPModel's own text-feature path: the obviously-correct version."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            per_template = []
            for template in templates:
                prompt = template.replace("{c}", name).replace("{}", name)
                tokens = tokenizer([prompt], return_tensors="pt")
                features = model.get_text_features(**tokens)
                features = getattr(features, "pooler_output", features)[0]
                per_template.append(features / features.norm())
            mean = torch.stack(per_template).mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_head_matches_direct_computation(clip):
    model, tokenizer = clip
    # batch_size=5 splits the 12 prompts over batches with different padding lengths.
    head = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=5)
    expected = _reference_weight(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert head.weight.shape == (len(CLASSNAMES), model.config.projection_dim) == (4, 16)
    torch.testing.assert_close(head.weight, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(4))
    assert head.classnames == CLASSNAMES and head.templates == TEMPLATES and head.num_classes == 4
    # Averaging happens over normalised template embeddings: one template alone gives a different head.
    single = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES[:1])
    assert not torch.allclose(single.weight, head.weight, atol=1e-3)


def test_batch_size_does_not_change_the_head(clip):
    model, tokenizer = clip
    one = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=1)
    all_at_once = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=64)
    torch.testing.assert_close(one.weight, all_at_once.weight, atol=1e-5, rtol=1e-5)


def test_logits_and_logit_scale(clip):
    model, tokenizer = clip
    head = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert math.isclose(head.logit_scale.exp().item(), 100.0, rel_tol=1e-5)
    torch.testing.assert_close(head.logit_scale, model.logit_scale.detach())
    image_embeds = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    logits = head(image_embeds)
    expected = 100.0 * (image_embeds / image_embeds.norm(dim=-1, keepdim=True)) @ head.weight.T
    assert logits.shape == (3, 4)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    # Image embeddings are normalised inside: their scale does not matter.
    torch.testing.assert_close(head(7.5 * image_embeds), logits, atol=1e-4, rtol=1e-5)
    assert head(image_embeds.double()).dtype == torch.float64


def test_head_buffers_follow_to_and_do_not_train(clip):
    model, tokenizer = clip
    head = build_zeroshot_head(model, tokenizer, CLASSNAMES[:2], TEMPLATES[:1])
    assert list(head.parameters()) == []
    assert {name for name, _ in head.named_buffers()} == {"weight", "logit_scale"}
    assert head.to(torch.float64).weight.dtype == torch.float64


def test_model_state_is_restored(clip):
    model, tokenizer = clip
    model.train()
    build_zeroshot_head(model, tokenizer, CLASSNAMES[:1], TEMPLATES[:1])
    assert model.training
    model.eval()


def test_build_errors(clip):
    model, tokenizer = clip
    with pytest.raises(WEMoEError, match="no class names"):
        build_zeroshot_head(model, tokenizer, [], TEMPLATES)
    with pytest.raises(WEMoEError, match="placeholder"):
        build_zeroshot_head(model, tokenizer, CLASSNAMES, ["no class here"])
    with pytest.raises(WEMoEError, match="text tower"):
        build_zeroshot_head(model.vision_model, tokenizer, CLASSNAMES, TEMPLATES)
    with pytest.raises(ValueError, match="3 class names"):
        ZeroShotHead(torch.zeros(2, 4), 0.0, classnames=["a", "b", "c"])


def test_save_and_load_round_trip(clip, tmp_path):
    model, tokenizer = clip
    head = build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES)
    head.save(tmp_path / "h.safetensors", metadata={"task": "x"})
    loaded = ZeroShotHead.load(tmp_path / "h.safetensors")
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.logit_scale, head.logit_scale)
    assert loaded.classnames == CLASSNAMES and loaded.templates == TEMPLATES
    assert [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------
# cache


def test_cache_hit_skips_the_model(clip_dir, clip, tmp_path, monkeypatch):
    model, tokenizer = clip
    cache = tmp_path / "heads"
    first = load_or_build_head(str(clip_dir), CLASSNAMES, TEMPLATES, cache_dir=cache)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1
    torch.testing.assert_close(
        first.weight, build_zeroshot_head(model, tokenizer, CLASSNAMES, TEMPLATES).weight
    )

    def fail(*args, **kwargs):
        raise AssertionError("the cached head should have been used")

    monkeypatch.setattr(heads_module, "_load_clip", fail)
    monkeypatch.setattr(heads_module, "build_zeroshot_head", fail)
    second = load_or_build_head(str(clip_dir), CLASSNAMES, TEMPLATES, cache_dir=cache)
    assert torch.equal(second.weight, first.weight) and torch.equal(second.logit_scale, first.logit_scale)
    assert second.classnames == CLASSNAMES
    assert sorted(cache.glob("*.safetensors")) == files


def test_cache_key_changes_with_templates_classnames_and_model(clip_dir, tmp_path):
    cache = tmp_path / "heads"
    load_or_build_head(clip_dir, CLASSNAMES, TEMPLATES, cache_dir=cache)
    load_or_build_head(clip_dir, CLASSNAMES, TEMPLATES[:2], cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    load_or_build_head(clip_dir, CLASSNAMES[::-1], TEMPLATES, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 3
    other = make_tiny_clip(tmp_path / "other_clip", seed=1)
    head = load_or_build_head(other, CLASSNAMES, TEMPLATES, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 4
    assert head.classnames == CLASSNAMES


def test_several_heads_load_the_model_once(clip_dir, tmp_path, monkeypatch):
    loads = []
    original = heads_module._load_clip

    def counting(*args):
        loads.append(args)
        return original(*args)

    monkeypatch.setattr(heads_module, "_load_clip", counting)
    tasks = {"a": (CLASSNAMES, TEMPLATES), "b": (["x", "y"], ["{c}"]), "c": (["z"], ["a {c}."])}
    heads = load_or_build_heads(clip_dir, tasks, cache_dir=tmp_path)
    assert list(heads) == ["a", "b", "c"] and heads["b"].num_classes == 2
    assert len(loads) == 1


def test_damaged_cache_entry_is_rebuilt(clip_dir, tmp_path):
    head = load_or_build_head(clip_dir, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"garbage")
    again = load_or_build_head(clip_dir, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(again.weight, head.weight)
    assert ZeroShotHead.load(entry).classnames == CLASSNAMES


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_WEMOE_CACHE", str(tmp_path / "root"))
    assert heads_cache_dir() == tmp_path / "root" / "heads"
    monkeypatch.delenv("HF_WEMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert heads_cache_dir() == tmp_path / "xdg" / "hf_wemoe" / "heads"


def test_local_identity_is_a_content_hash(clip_dir, tmp_path):
    first = model_identity(clip_dir)
    assert first.startswith("sha256:") and model_identity(str(clip_dir)) == first
    copy = make_tiny_clip(tmp_path / "same_seed", seed=0)
    assert model_identity(copy) == first  # same content, other place: same identity
    (copy / "README.md").write_text("a model card does not change the head")
    (copy / "flax_model.msgpack").write_bytes(b"weights for another framework")
    (copy / "pytorch_model.bin").write_bytes(b"not loaded: safetensors wins")
    assert model_identity(copy) == first
    (copy / "vocab.json").write_text((copy / "vocab.json").read_text().replace('"a</w>"', '"A</w>"'))
    assert model_identity(copy) != first
    with pytest.raises(SourceError, match="no model weights"):
        model_identity(tmp_path / "same_seed" / "..")


def test_hub_identity(monkeypatch, tmp_path):
    sha = "89ab" * 10
    assert model_identity(f"openai/clip-vit-base-patch32@{sha}") == f"hub:openai/clip-vit-base-patch32@{sha}"
    with pytest.raises(SourceError, match="neither an existing local folder nor a Hub repo id"):
        model_identity("./no/such/folder")

    # Offline: the commit comes from the local Hub cache (refs/<revision> -> snapshots/<sha>).
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="offline mode.*not in the local Hub cache"):
        model_identity("org/clip")
    repo = tmp_path / "models--org--clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    assert model_identity("org/clip") == f"hub:org/clip@{sha}"
    assert model_identity("org/clip@main") == f"hub:org/clip@{sha}"


def test_hub_identity_asks_the_hub_first(monkeypatch):
    import huggingface_hub

    class Info:
        sha = "fe" * 20

    asked = []

    def model_info(self, repo_id, revision=None):
        asked.append((repo_id, revision))
        return Info()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert model_identity("org/clip@v1.0") == f"hub:org/clip@{Info.sha}"
    assert asked == [("org/clip", "v1.0")]


def test_non_clip_folder_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    CLIPVisionModel(config).save_pretrained(tmp_path / "vision_only")
    with pytest.raises(SourceError, match="is a .clip_vision_model. model, not a full CLIP"):
        load_or_build_head(tmp_path / "vision_only", ["a"], ["{c}"], cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_hub_model_through_a_local_hub(clip_dir, tmp_path):
    """A Hub CLIP: the cache key uses the resolved commit, online and (from the local Hub cache) offline."""
    from hub_server import HubServer, client_env, client_result, run_client

    code = f"""
        import json
        import huggingface_hub
        from huggingface_hub import HfApi
        from hf_wemoe.zeroshot import heads

        api = HfApi()
        api.create_repo("testorg/clip")
        sha = api.upload_folder(repo_id="testorg/clip", folder_path={str(clip_dir)!r}).oid
        cache = {str(tmp_path / "heads")!r}
        first = heads.load_or_build_head("testorg/clip", ["cat", "dog"], ["a photo of a {{c}}."], cache_dir=cache)
        out = {{"sha": sha, "identity": heads.model_identity("testorg/clip")}}

        def fail(*args):
            raise AssertionError("model loaded although the head is cached")

        heads._load_clip = fail
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        out["offline_identity"] = heads.model_identity("testorg/clip")
        again = heads.load_or_build_head("testorg/clip", ["cat", "dog"], ["a photo of a {{c}}."], cache_dir=cache)
        out["same"] = bool((again.weight == first.weight).all())
        out["weight"] = first.weight.tolist()
        print("@@RESULT@@ " + json.dumps(out))
    """
    with HubServer(tmp_path / "hub") as server:
        out = client_result(run_client(code, client_env(server, tmp_path / "hf_home", disable_xet=True)))
    assert out["identity"] == out["offline_identity"] == f"hub:testorg/clip@{out['sha']}"
    assert out["same"]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    expected = build_zeroshot_head(
        model, AutoTokenizer.from_pretrained(clip_dir), ["cat", "dog"], ["a photo of a {c}."]
    )
    torch.testing.assert_close(torch.tensor(out["weight"]), expected.weight)
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 1
