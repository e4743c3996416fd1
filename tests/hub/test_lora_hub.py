"""LoRA experts from the Hub, end to end through the command line: merge -> train -> eval -> push.

Tiny stand-ins of FusionBench's B/16 LoRA adapters (PEFT adapters of the vision transformer, rank 16 on q_proj and
v_proj, base recorded as `openai/clip-vit-base-patch16`) are served by the local Hub server under their real ids,
one of them at a tag whose branch has moved on since.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from adaptation_fixtures import make_adaptation_world
from hf_wemoe import WEMoECLIPVisionModel
from hf_wemoe.cli.main import main
from lora_adapters import edit_adapter_config, make_adapter, peft_merged

BASE = "openai/clip-vit-base-patch16"
ADAPTERS = {
    "blocks": "tanganke/clip-vit-base-patch16_mnist_lora-16",
    "stripes": "tanganke/clip-vit-base-patch16_svhn_lora-16",
}
PUSHED = "testorg/wemoe-lora-b16"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "merge_lora_b16.py"


@pytest.fixture(scope="module")
def lora_hub(hub_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-hub")
    world = make_adaptation_world(root)
    hub_server.create_repo(BASE)
    hub_server.commit_folder(BASE, world["clip"])
    heads = {}
    for seed, (task, repo) in enumerate(ADAPTERS.items()):
        options = dict(on="vision_model", r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        first = make_adapter(world["clip"], root / f"{task}-v1", seed=seed, **options)
        edit_adapter_config(first, base_model_name_or_path=BASE)
        hub_server.create_repo(repo)
        heads[task] = hub_server.commit_folder(repo, first)
        world[f"adapter-{task}"] = first
    # The blocks adapter: tag v1, then main moved on to other factors.
    repo = ADAPTERS["blocks"]
    hub_server.store.create_tag(hub_server.store.get_repo("model", repo), "v1", heads["blocks"])
    later = make_adapter(world["clip"], root / "blocks-later", seed=9, **options)
    hub_server.commit_folder(repo, edit_adapter_config(later, base_model_name_or_path=BASE))
    return world, heads


def test_lora_experts_from_the_hub_merge_train_eval_push(lora_hub, hub_server, tmp_path, capsys):
    world, heads = lora_hub
    merged, trained = tmp_path / "merged", tmp_path / "trained"
    args = ["merge", "-q", "--base", BASE, "--moe-modules", "q_proj,v_proj", "--output", str(merged)]
    args += ["--expert", f"blocks={ADAPTERS['blocks']}@v1", "--expert", f"stripes={ADAPTERS['stripes']}"]
    assert main(args) == 0
    assert "merged 2 experts (blocks, stripes) with wemoe" in capsys.readouterr().out

    # The model: rank 16, q/v routed; collapsing to an expert gives PEFT's merge of the adapter at that revision.
    config = json.loads((merged / "config.json").read_text())
    assert config["rank"] == 16 and config["moe_modules"] == ["q_proj", "v_proj"]
    experts = config["provenance"]["experts"]
    assert experts["blocks"]["revision"] == "v1" and experts["blocks"]["commit"] == heads["blocks"]
    assert (
        experts["blocks"]["layout"] == "peft_lora" and experts["blocks"]["lora"]["base_check"] == "hub repo"
    )
    model = WEMoECLIPVisionModel.from_pretrained(merged).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for k, task in enumerate(ADAPTERS):
        reference = peft_merged(world["clip"], world[f"adapter-{task}"], on="vision_model")
        collapsed = model.collapse([1.0 - k, float(k)])
        state = collapsed.state_dict()
        for key, tensor in reference.items():
            torch.testing.assert_close(state[key], tensor, rtol=0, atol=1e-5, msg=key)
        assert collapsed(pixel_values=pixels).pooler_output.isfinite().all()
    recipe = yaml.safe_load((merged / "merge_config.yaml").read_text())
    assert recipe["experts"]["blocks"] == f"{ADAPTERS['blocks']}@{heads['blocks']}"
    assert recipe["rank"] == 16 and recipe["moe_modules"] == ["q_proj", "v_proj"]

    tasks = ["--task", f"blocks={world['blocks']}", "--task", f"stripes={world['stripes']}"]
    train = ["train", "-q", "--model", str(merged), *tasks, "--templates", "generic", "--steps", "2"]
    assert main([*train, "--batch-size-per-task", "4", "--output", str(trained)]) == 0
    results = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "-q",
                "--model",
                str(trained),
                *tasks,
                "--templates",
                "generic",
                "--output-json",
                str(results),
            ]
        )
        == 0
    )
    accuracy = json.loads(results.read_text())["accuracy"]
    assert set(accuracy) == {"blocks", "stripes"}
    capsys.readouterr()

    assert main(["push", "-q", str(trained), "--repo-id", PUSHED]) == 0
    files = set(hub_server.files(PUSHED))
    assert {
        "config.json",
        "model.safetensors",
        "merge_config.yaml",
        "README.md",
        "eval_results.json",
    } <= files
    card = ModelCard(hub_server.read_file(PUSHED, "README.md").decode())
    assert card.data.base_model == [BASE, *ADAPTERS.values()]
    assert "low rank 16 (τk ≈ Bk·Ak; LoRA experts exact, as their own factors)" in card.text
    assert (
        "the PEFT LoRA adapters (blocks: rank 16, stripes: rank 16) exactly, as their own factors"
        in card.text
    )
    pushed = json.loads(hub_server.read_file(PUSHED, "config.json"))
    assert pushed["provenance"]["low_rank"]["kept_energy"]["0"] == {"blocks": 1.0, "stripes": 1.0}


def load_script():
    spec = importlib.util.spec_from_file_location("merge_lora_b16", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_b16_lora_script_runs_unchanged_on_the_hub(lora_hub, tmp_path, capsys):
    script = load_script()
    output = tmp_path / "wemoe-lora-b16"
    assert script.main(["--tasks", "mnist,svhn", "--analyze", "--output", str(output), "-q"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"hf-wemoe merge --base {BASE} --moe-modules q_proj,v_proj --expert mnist={ADAPTERS['blocks']}"
        in printed
    )
    assert "| 0 | q_proj | 32 | " in printed  # the analysis table: q_proj of layer 0, 32 wide
    analysis = json.loads((tmp_path / "wemoe-lora-b16-analysis" / "analysis.json").read_text())
    assert {row["module"] for row in analysis["modules"] if row["rank"]["mnist"] > 0} == {"q_proj", "v_proj"}
    config = json.loads((output / "config.json").read_text())
    assert config["expert_names"] == ["mnist", "svhn"] and config["rank"] == 16
