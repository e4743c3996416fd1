"""A tiny but complete world for train/eval tests: a CLIP model, two experts, a WEMoE merge, two datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPVisionModel

from hf_wemoe import build_wemoe
from tiny_clip import make_tiny_clip

CLASSNAMES = {"blocks": ["red", "green", "blue", "white"], "stripes": ["left", "right", "up", "down"]}


def make_task_dataset(path: Path, task: str, num_images: int, seed: int) -> Path:
    """A DatasetDict (train/test) of 32x32 images whose mean colour/orientation depends on the label."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", num_images), ("test", num_images)):
        images, labels = [], []
        for i in range(count):
            label = i % 4
            array = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            if task == "blocks":
                array[..., min(label, 2)] += 150 if label < 3 else 100
            else:
                array[(slice(None, None, 2) if label < 2 else slice(None)), :: (2 if label >= 2 else 1)] += (
                    120
                )
            images.append(Image.fromarray(array))
            labels.append(label)
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSNAMES[task])}
        )
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def make_adaptation_world(root: Path) -> dict[str, Path]:
    """Save a tiny CLIP (`clip`), a WEMoE model merged from two perturbed experts (`wemoe`), a static expert
    (`expert`) and two task datasets (`blocks`, `stripes`) under `root`."""
    clip_dir = make_tiny_clip(root / "clip", seed=0)
    clip = CLIPModel.from_pretrained(clip_dir)
    base = CLIPVisionModel(clip.config.vision_config)
    base.vision_model.load_state_dict(clip.vision_model.state_dict()) if hasattr(base, "vision_model") else (
        base.load_state_dict(clip.vision_model.state_dict())
    )
    generator = torch.Generator().manual_seed(1)
    experts = {}
    for name in CLASSNAMES:
        expert = CLIPVisionModel(clip.config.vision_config)
        expert.load_state_dict(
            {k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
        )
        experts[name] = expert.eval()
    for name, expert in experts.items():
        expert.save_pretrained(root / f"expert-{name}")
    model = build_wemoe(base.eval(), experts, base_model_ref=str(clip_dir))
    model.save_pretrained(root / "wemoe")
    return {
        "clip": clip_dir,
        "wemoe": root / "wemoe",
        "expert": root / "expert-stripes",
        "expert-blocks": root / "expert-blocks",
        "blocks": make_task_dataset(root / "blocks", "blocks", 24, seed=0),
        "stripes": make_task_dataset(root / "stripes", "stripes", 24, seed=1),
    }
