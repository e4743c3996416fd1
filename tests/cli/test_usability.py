"""The rough edges a new user hits: card expert order after train, recipes that work from the model folder, the
push warning for local paths, templates and --clip-model defaults, saving from Python, `hf-wemoe env`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel, pipeline

import hf_wemoe
from adaptation_fixtures import make_task_dataset
from clip_worlds import as_if_from_the_hub, make_clip_world, sample_image
from hf_wemoe.cli.main import main
from hf_wemoe.errors import WEMoEError
from hf_wemoe.hub.cards import local_source_paths, model_card
from hf_wemoe.zeroshot.templates import resolve_task_templates

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP, two experts, their datasets, and a WEMoE merge given relative paths with the experts in
    non-alphabetical order (stripes, then blocks), run from the world's folder."""
    root = tmp_path_factory.mktemp("usability").resolve()
    world = make_clip_world(root)
    world["data-blocks"] = make_task_dataset(root / "data-blocks", "blocks", 8, seed=0)
    world["data-stripes"] = make_task_dataset(root / "data-stripes", "stripes", 8, seed=1)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        args = ["merge", "-q", "--base", "clip", "--expert", "stripes=expert-stripes"]
        args += ["--expert", "blocks=expert-blocks", "--output", "merged"]
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    world["merged"] = root / "merged"
    world["root"] = root
    return world


def train_args(world, output: Path, *extra: str) -> list[str]:
    return [
        "train", "-q", "--model", str(world["merged"]),
        "--task", f"blocks={world['data-blocks']}", "--task", f"stripes={world['data-stripes']}",
        "--templates", "generic", "--batch-size-per-task", "4", "--steps", "1", "--no-evaluate",
        "--output", str(output), *extra,
    ]  # fmt: skip


def recipe_expert_order(text: str) -> list[str]:
    """The expert names in the order the card's recipe section lists them."""
    recipe = text.split("## Recipe")[1]
    return sorted(("stripes", "blocks"), key=lambda name: recipe.index(f"  {name}: "))


# ----------------------------------------------------------------------------------------------------------------
# The card after train


def test_the_card_after_train_lists_the_experts_in_routing_order(world, tmp_path):
    config = json.loads((world["merged"] / "config.json").read_text())
    assert config["expert_names"] == ["stripes", "blocks"]
    adapted = tmp_path / "adapted"
    assert main(train_args(world, adapted)) == 0
    # train carries the merge recipe over: the card shows it and it rebuilds the merge.
    assert (adapted / "merge_config.yaml").read_bytes() == (world["merged"] / "merge_config.yaml").read_bytes()
    text = (adapted / "README.md").read_text()
    assert 'expert "stripes" alone' in text and "model.collapse([1.0, 0.0])" in text
    assert recipe_expert_order(text) == ["stripes", "blocks"]
    # Without merge_config.yaml the card takes the recipe recorded in config.json, whose keys JSON sorts.
    (adapted / "merge_config.yaml").unlink()
    card = model_card(adapted)
    assert 'expert "stripes" alone' in card.text
    assert recipe_expert_order(card.text) == ["stripes", "blocks"]
    assert card.text.index("| stripes |") < card.text.index("| blocks |")


def test_train_outputs_follow_the_umask_like_merge_outputs(world, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(train_args(world, tmp_path / "adapted")) == 0
    finally:
        os.umask(old)
    adapted = tmp_path / "adapted"
    assert adapted.stat().st_mode & 0o777 == 0o750
    modes = {path.name: path.stat().st_mode & 0o777 for path in adapted.iterdir() if path.is_file()}
    assert modes and all(mode == 0o640 for mode in modes.values()), modes


# ----------------------------------------------------------------------------------------------------------------
# Recipes work from anywhere; the push warns about local paths


def test_recipes_record_local_sources_as_absolute_paths(world, tmp_path, monkeypatch):
    root, merged = world["root"], world["merged"]
    recipe = yaml.safe_load((merged / "merge_config.yaml").read_text())
    assert recipe["base"] == str(root / "clip")
    assert recipe["experts"] == {"stripes": str(root / "expert-stripes"), "blocks": str(root / "expert-blocks")}
    config = json.loads((merged / "config.json").read_text())
    assert config["base_model_ref"] == str(root / "clip")
    assert config["expert_refs"] == [str(root / "expert-stripes"), str(root / "expert-blocks")]
    # The rebuild command the recipe prints works from the model folder.
    monkeypatch.chdir(merged)
    assert main(["merge", "-q", "--config", "merge_config.yaml", "--output", str(tmp_path / "rebuilt")]) == 0
    first, again = load_file(merged / "model.safetensors"), load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)


def test_push_warns_when_the_card_would_publish_local_paths(world, tmp_path, hub_server, caplog):
    root = world["root"]
    assert local_source_paths(world["merged"]) == [
        str(root / "clip"),
        str(root / "expert-stripes"),
        str(root / "expert-blocks"),
    ]
    assert local_source_paths(as_if_from_the_hub(world["merged"], tmp_path / "hub")) == []
    with caplog.at_level(logging.WARNING, logger="hf_wemoe"):
        hf_wemoe.push_folder(world["merged"], "testorg/usability-local", backoff=0.01, show_progress=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("local paths" in message and str(root / "clip") in message for message in warnings), warnings


# ----------------------------------------------------------------------------------------------------------------
# Templates and the zero-shot CLIP model


def test_a_task_without_built_in_templates_names_the_generic_set():
    with pytest.raises(WEMoEError, match="no built-in prompt templates for task 'mystery'") as error:
        resolve_task_templates("mystery", dataset_name="org/mystery-data")
    assert "--templates generic works for any task" in str(error.value)


def test_eval_of_a_full_clip_uses_its_own_text_tower(world, tmp_path, capsys):
    out_json = tmp_path / "clip.json"
    args = ["eval", "-q", "--model", str(world["clip"]), "--task", f"blocks={world['data-blocks']}"]
    assert main([*args, "--templates", "generic", "--output-json", str(out_json)]) == 0
    explicit = tmp_path / "explicit.json"
    assert main([*args, "--templates", "generic", "--clip-model", str(world["clip"]), "--output-json", str(explicit)]) == 0
    assert json.loads(out_json.read_text())["accuracy"] == json.loads(explicit.read_text())["accuracy"]


# ----------------------------------------------------------------------------------------------------------------
# The Python API


def test_save_model_writes_what_pipelines_need(world, tmp_path):
    clip = CLIPModel.from_pretrained(world["clip"])
    base = CLIPVisionModel(clip.config.vision_config)
    (base.vision_model if hasattr(base, "vision_model") else base).load_state_dict(clip.vision_model.state_dict())
    experts = {name: CLIPVisionModel.from_pretrained(world[name]) for name in ("blocks", "stripes")}
    model = hf_wemoe.build_wemoe(base.eval(), experts)
    with pytest.raises(WEMoEError, match="pass processor="):
        hf_wemoe.save_model(model, tmp_path / "no-processor")
    assert not (tmp_path / "no-processor").exists()
    folder = hf_wemoe.save_model(model, tmp_path / "saved", processor=str(world["clip"]))
    assert (folder / "preprocessor_config.json").is_file() and (folder / "model.safetensors").is_file()
    extractor = pipeline("image-feature-extraction", model=str(folder))
    features = extractor(sample_image())
    assert torch.tensor(features).shape[-1] == clip.config.vision_config.hidden_size
    # The base recorded by build_wemoe is the default processor source.
    recorded = hf_wemoe.build_wemoe(base.eval(), experts, base_model_ref=str(world["clip"]))
    assert (hf_wemoe.save_model(recorded, tmp_path / "recorded") / "preprocessor_config.json").is_file()


def test_card_and_push_functions_are_public_names():
    from hf_wemoe.hub.cards import model_card, write_card
    from hf_wemoe.hub.push import push_folder
    from hf_wemoe.io.saving import save_model

    assert hf_wemoe.model_card is model_card and hf_wemoe.write_card is write_card
    assert hf_wemoe.push_folder is push_folder and hf_wemoe.save_model is save_model
    assert {"model_card", "write_card", "push_folder", "save_model"} <= set(hf_wemoe.__all__)


# ----------------------------------------------------------------------------------------------------------------
# Project files and `hf-wemoe env`


def test_env_reports_versions_devices_and_caches_without_the_token(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for expected in (
        f"- hf-wemoe: {hf_wemoe.__version__}",
        f"  - torch: {torch.__version__}",
        "  - transformers: ",
        "  - cuda: ",
        f"  - zero-shot heads: {os.path.join(os.environ['HF_WEMOE_CACHE'], 'heads')}",
        "  - hub downloads: ",
        "  - HF_TOKEN: set",
    ):
        assert expected in text, expected
    assert os.environ["HF_TOKEN"] not in text
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hf-wemoe"] == hf_wemoe.__version__ and report["packages"]["torch"] == torch.__version__
    assert set(report) == {"hf-wemoe", "python", "platform", "packages", "devices", "caches", "environment"}


def test_env_help_loads_no_heavy_library():
    code = (
        "import sys\n"
        "from hf_wemoe.cli.main import main\n"
        "try:\n"
        "    main(['env', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0\n"
        "print('LOADED', [name for name in ('torch', 'transformers') if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def test_the_changelog_has_a_section_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{hf_wemoe.__version__}]" in changelog
    assert 'pip install "hf-wemoe @ git+' in (ROOT / "README.md").read_text()
