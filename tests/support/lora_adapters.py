"""PEFT LoRA adapters made by PEFT itself on tiny CLIP models, and PEFT's own merge of them (the reference).

PEFT initialises every `lora_B` to zero, which would make every adapter a no-op; `make_adapter` gives the factors
seeded random values before saving, so that each adapter is a real, distinct low-rank task vector.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModel


def load_base(folder: Path) -> CLIPVisionModel | CLIPModel:
    """The model saved in `folder` (a `CLIPVisionModel`, or a `CLIPModel` for a full CLIP checkpoint)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    cls = CLIPModel if config.get("model_type") == "clip" else CLIPVisionModel
    return cls.from_pretrained(folder).eval()


def make_adapter(
    base_folder: Path,
    folder: Path,
    *,
    seed: int,
    scale: float = 0.2,
    on: str = "model",
    **lora: Any,
) -> Path:
    """Save a PEFT LoRA adapter of the model in `base_folder` to `folder` (`save_pretrained`) and return it.

    Args:
        base_folder: a saved `CLIPVisionModel` or `CLIPModel` (PEFT records this path as the adapter's base).
        seed: seed of the random factors (lora_A and lora_B, `scale` times a standard normal).
        on: `"model"` wraps the loaded model; `"vision_model"` wraps its vision transformer (as FusionBench's
            adapters on the Hub were made: keys without any prefix; only for a `CLIPModel` base).
        **lora: `LoraConfig` options (r, lora_alpha, target_modules, use_rslora, layers_to_transform, ...).
    """
    base = load_base(base_folder)
    model = base.vision_model if on == "vision_model" else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on nn.Linear, which is the point
        peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return Path(folder)


def peft_merged(base_folder: Path, adapter: Path, on: str = "model") -> dict[str, torch.Tensor]:
    """PEFT's merge of `adapter` into the model of `base_folder` (`PeftModel.from_pretrained(...)
    .merge_and_unload()`, `on` as for `make_adapter`): the vision tower's state dict in the `CLIPVisionModel`
    layout (no `vision_model.` prefix)."""
    base = load_base(base_folder)
    model = base.vision_model if on == "vision_model" else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    state = merged.state_dict()
    if isinstance(merged, CLIPModel):
        state = {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
    return {key: tensor for key, tensor in state.items() if not key.endswith("position_ids")}


def edit_adapter_config(folder: Path, **changes: Any) -> Path:
    """Change values of an adapter's `adapter_config.json` in place."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return Path(folder)


def rename_adapter_keys(folder: Path, old: str, new: str) -> Path:
    """Rewrite the adapter's tensor names, replacing the prefix `old` by `new` (e.g. to the transformers-4 layout
    `base_model.model.vision_model.` of a `CLIPVisionModel`)."""
    path = Path(folder) / "adapter_model.safetensors"
    state = load_file(path)
    state = {(new + key[len(old) :] if key.startswith(old) else key): value for key, value in state.items()}
    save_file(state, path, metadata={"format": "pt"})
    return Path(folder)
