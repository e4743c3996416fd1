"""A tiny full CLIP base with two vision experts, merged through the command line; sample images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from PIL import Image
from transformers import CLIPModel, CLIPVisionModel

from hf_wemoe.cli.main import main
from tiny_clip import make_tiny_clip

EXPERTS = ("blocks", "stripes")


def make_clip_world(root: Path) -> dict[str, Path]:
    """A tiny full CLIP base (tokenizer, image processor, a card with a license) and two vision experts."""
    clip_dir = make_tiny_clip(root / "clip", seed=0)
    (clip_dir / "README.md").write_text("---\nlicense: mit\n---\n# A tiny CLIP\n")
    clip = CLIPModel.from_pretrained(clip_dir)
    generator = torch.Generator().manual_seed(1)
    world = {"clip": clip_dir}
    for name in EXPERTS:
        expert = CLIPVisionModel(clip.config.vision_config)
        state = clip.vision_model.state_dict()
        expert.load_state_dict(
            {k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        )
        world[name] = root / f"expert-{name}"
        expert.save_pretrained(world[name])
    return world


def merge(world: dict[str, Path], output: Path, *extra: str) -> Path:
    experts = [arg for name in EXPERTS for arg in ("--expert", f"{name}={world[name]}")]
    assert main(["merge", "-q", "--base", str(world["clip"]), *experts, "--output", str(output), *extra]) == 0
    return output


def sample_image(seed: int = 0, size: int = 40) -> Image.Image:
    """A random RGB image (the pipelines take PIL images)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def adapt(folder: Path) -> Path:
    """What `hf-wemoe train` adds to a folder: adaptation provenance, eval_results.json, routing.png."""
    config = json.loads((folder / "config.json").read_text())
    tasks = {
        "blocks": "tanganke/dtd#test",
        "stripes": "ufldl-stanford/svhn:cropped_digits",
        "local": "/data/x",
    }
    config["provenance"]["adaptation"] = {
        "tasks": tasks,
        "options": {"objective": "entropy", "lr": 0.0001, "batch_size_per_task": 16, "steps": 1000},
        "steps": 1000,
        "final_loss": 0.123456,
    }
    (folder / "config.json").write_text(json.dumps(config))
    accuracy = {"blocks": 71.25, "stripes": 95.5, "local": 50.0}
    results = {
        "model": str(folder),
        "routing": "sample",
        "accuracy": accuracy,
        "average": sum(accuracy.values()) / 3,
        "num_examples": {"blocks": 1880, "stripes": 26032, "local": 10},
        "datasets": tasks,
        "baselines": [
            {"name": "before adaptation", "accuracy": {"blocks": 50.0, "stripes": 60.0, "local": 40.0}}
        ],
    }
    (folder / "eval_results.json").write_text(json.dumps(results))
    (folder / "routing.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


BASE = "openai/clip-vit-base-patch32"

HUB_EXPERTS = {
    "blocks": "tanganke/clip-vit-base-patch32_dtd",
    "stripes": "tanganke/clip-vit-base-patch32_svhn",
}

COMMITS = {"base": "a" * 40, "blocks": "b" * 40, "stripes": "c" * 40}

def as_if_from_the_hub(folder: Path, target: Path) -> Path:
    """A copy of a merged folder whose recorded sources are Hub repos at known commits."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    hub = {"source": "hub", "revision": None, "layout": "clip"}
    config["provenance"]["base"] = {"ref": BASE, "repo_id": BASE, "commit": COMMITS["base"], **hub}
    config["provenance"]["experts"] = {
        name: {"ref": ref, "repo_id": ref, "commit": COMMITS[name], **hub}
        for name, ref in HUB_EXPERTS.items()
    }
    (target / "config.json").write_text(json.dumps(config))
    recipe = yaml.safe_load((target / "merge_config.yaml").read_text())
    recipe["base"] = f"{BASE}@{COMMITS['base']}"
    recipe["experts"] = {name: f"{ref}@{COMMITS[name]}" for name, ref in HUB_EXPERTS.items()}
    (target / "merge_config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return target
