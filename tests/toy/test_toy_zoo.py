"""The offline toy zoo: tasks, tokenizer, folder layout, loadability, determinism and the world's effect.

The small preset is built once per session (``toy_zoo_small`` in ``toy_fixtures.py``). Determinism is checked
on a micro preset (every task, a few images and a few optimisation steps) built twice: the same code path as
a real build at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_wemoe.errors import WEMoEError
from hf_wemoe.toy import TASKS, ZooManifest, build_toy_zoo, custom_preset, default_zoo_dir, get_toy_zoo
from hf_wemoe.toy import build as build_module
from hf_wemoe.toy.manifest import RECIPE_VERSION
from hf_wemoe.toy.models import build_tokenizer, caption_words, to_pixel_values
from hf_wemoe.toy.tasks import _digits_split_indices, generate_split
from hf_wemoe.toy.training import FinetuneRecipe, PretrainRecipe, is_mlp_key

MICRO = custom_preset(
    "small",
    name="micro",
    n_pretrain=16,
    n_train=16,
    n_test=8,
    pretrain=PretrainRecipe(steps=3, batch_size=16, warmup=1),
    finetune=FinetuneRecipe(
        steps=3, batch_size=8, warmup=1, preserve_weight=3.0, preserve_batch_size=4, preserve_pool=8
    ),
    tasks=tuple(TASKS),
)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zoo.json"
    }


# ------------------------------------------------------------------------------------------------- tasks


def test_tasks_have_own_label_spaces_words_and_templates():
    assert len(TASKS) >= 6
    assert TASKS["digits"].source == "sklearn"
    for name, task in TASKS.items():
        assert task.num_classes >= 4, name
        assert len(set(task.classnames)) == task.num_classes, name
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in task.classnames), name
        assert len(task.templates) >= 2 and all("{c}" in t for t in task.templates), name
        assert task.prompts(task.classnames[0])[0] == task.templates[0].replace("{c}", task.classnames[0])


def test_generate_split_is_seeded_balanced_and_32px_rgb():
    for name in TASKS:
        images, labels = generate_split(name, "train", 2 * TASKS[name].num_classes, seed=3)
        again, labels_again = generate_split(name, "train", 2 * TASKS[name].num_classes, seed=3)
        assert labels == labels_again and all(np.array_equal(a, b) for a, b in zip(images, again)), name
        assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in images), name
        assert sorted(labels) == sorted(list(range(TASKS[name].num_classes)) * 2), name
        other, _ = generate_split(name, "train", 2 * TASKS[name].num_classes, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(images, other)), name
        test, _ = generate_split(name, "test", 2 * TASKS[name].num_classes, seed=3)
        assert not any(np.array_equal(a, b) for a, b in zip(images, test)), name
    # Handwritten test digits are never used for training (or pretraining).
    assert not set(_digits_split_indices("train")) & set(_digits_split_indices("test"))
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("digits", "validation", 4, seed=0)


def test_tokenizer_gives_caption_words_one_token_and_encodes_any_text():
    tokenizer = build_tokenizer()
    assert all(len(tokenizer.tokenize(w)) == 1 for w in caption_words())
    ids = tokenizer("A zebra, café!")["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra , café !"


# ------------------------------------------------------------------------------------------- small zoo


def test_zoo_layout_and_manifest(toy_zoo_small: ZooManifest):
    zoo = toy_zoo_small
    assert zoo.recipe_version == RECIPE_VERSION and zoo.preset == "small" and len(zoo.tasks) >= 6
    assert ZooManifest.load(zoo.root) == zoo
    assert zoo.base_path == zoo.root / "models" / zoo.base_model
    for task in zoo.tasks:
        assert zoo.expert_path(task) == zoo.root / "models" / f"{zoo.base_model}_{task}"
        assert zoo.classnames[task] == list(TASKS[task].classnames)
        assert zoo.templates[task] == list(TASKS[task].templates)
    assert set(zoo.accuracies) == {
        "zero_shot",
        "expert",
        "simple_average",
        "task_arithmetic",
        "oracle_routing",
    }
    assert {"datasets", "pretrain", "experts", "evaluate", "total"} <= set(zoo.timings)


def test_datasets_load_with_class_labels(toy_zoo_small: ZooManifest):
    from datasets import ClassLabel, DatasetDict, Image, load_from_disk

    for task in toy_zoo_small.tasks:
        data = load_from_disk(str(toy_zoo_small.dataset_path(task)))
        assert isinstance(data, DatasetDict) and set(data) == {"train", "test"}
        for split in ("train", "test"):
            assert len(data[split]) == toy_zoo_small.num_examples[task][split]
            assert isinstance(data[split].features["image"], Image)
            label = data[split].features["label"]
            assert isinstance(label, ClassLabel) and label.names == list(TASKS[task].classnames)
        first = data["test"][0]["image"]
        assert first.size == (32, 32) and first.mode == "RGB"
        images, labels = generate_split(
            task,
            "test",
            toy_zoo_small.num_examples[task]["test"],
            toy_zoo_small.seed,
            toy_zoo_small.settings["domain_shift"],
        )
        assert np.array_equal(np.asarray(first), images[0]) and data["test"]["label"] == labels


def test_models_load_with_auto_classes_and_pipeline(toy_zoo_small: ZooManifest):
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel, pipeline

    zoo = toy_zoo_small
    base = CLIPModel.from_pretrained(zoo.base_path)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base_path)
    processor = AutoProcessor.from_pretrained(zoo.base_path)
    assert base.config.vision_config.image_size == 32
    assert len(tokenizer) == base.config.text_config.vocab_size
    images, _ = generate_split("digits", "test", 4, zoo.seed)
    from PIL import Image

    pil = [Image.fromarray(a) for a in images]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, to_pixel_values(images), atol=1e-5, rtol=0)

    base_keys = set(base.vision_model.state_dict())
    for task in zoo.tasks:
        expert = CLIPVisionModel.from_pretrained(zoo.expert_path(task))
        assert (zoo.expert_path(task) / "preprocessor_config.json").is_file()
        state = expert.state_dict()
        assert set(state) == base_keys
        # The task knowledge sits in the MLPs: their relative change dwarfs that of the other tensors.
        base_state = base.vision_model.state_dict()

        def rel(pred, state=state, base_state=base_state):
            num = sum(float((state[k] - base_state[k]).norm() ** 2) for k in base_keys if pred(k))
            return (num / sum(float(base_state[k].norm() ** 2) for k in base_keys if pred(k))) ** 0.5

        assert rel(is_mlp_key) > 10 * rel(lambda k: not is_mlp_key(k)) > 0, task

    task = TASKS["digits"]
    classifier = pipeline("zero-shot-image-classification", model=str(zoo.base_path))
    template = task.templates[0].replace("{c}", "{}")
    out = classifier(pil[0], candidate_labels=list(task.classnames), hypothesis_template=template)
    with torch.no_grad():
        img = base.get_image_features(pixel_values=pixels[:1]).pooler_output
        tokens = tokenizer([template.format(c) for c in task.classnames], padding=True, return_tensors="pt")
        txt = base.get_text_features(**tokens).pooler_output
    expected = task.classnames[int((img / img.norm() @ (txt / txt.norm(dim=-1, keepdim=True)).T).argmax())]
    assert out[0]["label"] == expected


def test_world_shows_interference_and_routing_bound(toy_zoo_small: ZooManifest):
    from hf_wemoe.toy.evaluate_world import evaluate_world, format_table

    acc = toy_zoo_small.accuracies
    chance = np.mean([1 / TASKS[t].num_classes for t in toy_zoo_small.tasks])
    for task in toy_zoo_small.tasks:
        assert acc["expert"][task] > acc["zero_shot"][task], task
    assert acc["zero_shot"]["average"] > chance + 0.1
    assert acc["expert"]["average"] > acc["zero_shot"]["average"] + 0.1
    assert acc["task_arithmetic"]["average"] < acc["expert"]["average"] - 0.15
    assert acc["oracle_routing"]["average"] > acc["task_arithmetic"]["average"] + 0.15
    assert acc["oracle_routing"]["average"] > acc["expert"]["average"] - 0.05
    # The stored table is what the saved files give.
    again = evaluate_world(toy_zoo_small)
    for row, values in acc.items():
        assert again[row] == pytest.approx(values, abs=0.01), row
    assert "| task arithmetic (lambda=0.3) |" in format_table(acc)


def test_cli_reuses_an_existing_zoo(toy_zoo_small: ZooManifest, capsys, monkeypatch):
    from hf_wemoe.cli.main import main

    def no_build(*args, **kwargs):
        raise AssertionError("the zoo was rebuilt")

    monkeypatch.setattr(build_module, "build_toy_zoo", no_build)
    args = [
        "toy-zoo",
        "--output",
        str(toy_zoo_small.root),
        "--preset",
        "small",
        "--seed",
        str(toy_zoo_small.seed),
    ]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert str(toy_zoo_small.root) in out and "| individual experts |" in out


# ------------------------------------------------------------------------------- build mechanics (micro)


def test_build_is_deterministic_and_reusable(tmp_path, monkeypatch):
    # Experts fine-tuned one after another and in two worker processes give the same files.
    first = build_toy_zoo(tmp_path / "a", MICRO, seed=5, progress=False, workers=1)
    second = build_toy_zoo(tmp_path / "b", MICRO, seed=5, progress=False, workers=2)
    hashes = _file_hashes(first.root)
    assert any(name.endswith("model.safetensors") for name in hashes)
    assert any(name.endswith(".arrow") for name in hashes)
    assert hashes == _file_hashes(second.root)
    assert first.accuracies == second.accuracies
    assert not list(tmp_path.glob(".*tmp*")), "temporary build folders left behind"

    with pytest.raises(WEMoEError, match="already exists"):
        build_toy_zoo(first.root, MICRO, seed=5, progress=False)
    # get_toy_zoo reuses a matching zoo, and rebuilds one of another seed in place.
    assert get_toy_zoo(MICRO, seed=5, output_dir=first.root, progress=False) == first
    rebuilt = get_toy_zoo(MICRO, seed=6, output_dir=first.root, progress=False)
    assert rebuilt.seed == 6 and ZooManifest.load(first.root).seed == 6
    assert _file_hashes(first.root) != hashes


def test_refuses_to_replace_other_folders_and_bad_input(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(WEMoEError, match="not a toy zoo"):
        get_toy_zoo(MICRO, output_dir=precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(WEMoEError, match="unknown toy zoo preset"):
        build_toy_zoo(tmp_path / "x", "huge", progress=False)
    with pytest.raises(WEMoEError, match="not a toy zoo manifest"):
        ZooManifest.load(tmp_path)


def test_default_zoo_dir_follows_cache_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_WEMOE_CACHE", str(tmp_path / "cache"))
    assert default_zoo_dir("small", 3) == tmp_path / "cache" / "toy-zoo" / f"{RECIPE_VERSION}-small-3"
    monkeypatch.delenv("HF_WEMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_zoo_dir() == tmp_path / "xdg" / "hf_wemoe" / "toy-zoo" / f"{RECIPE_VERSION}-full-0"
