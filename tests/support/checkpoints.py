"""Checkpoints written the way different tools write them (the inputs of the source and merge tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from tiny_models import make_base_and_experts

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=64,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def write_checkpoint(model: CLIPVisionModel, folder: Path, layout: str = "v5") -> Path:
    """Save a CLIP vision tower the way different tools do.

    v5: `save_pretrained` of transformers 5 (no key prefix); v4: safetensors with the `vision_model.` prefix and
    the `position_ids` buffer, as transformers 4 saved it; clip: a full `CLIPModel` holding this vision tower;
    sharded: v5 split into several files with an index; pickle: v4 keys in `pytorch_model.bin` only.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    if layout == "v5":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
    elif layout in ("v4", "pickle"):
        prefixed = {f"vision_model.{key}": tensor for key, tensor in state.items()}
        num_positions = model.config.image_size // model.config.patch_size
        prefixed["vision_model.embeddings.position_ids"] = torch.arange(num_positions**2 + 1).unsqueeze(0)
        if layout == "v4":
            save_file(prefixed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(prefixed, folder / "pytorch_model.bin")
        model.config.save_pretrained(folder)
    elif layout == "clip":
        config = CLIPConfig(
            vision_config=model.config.to_dict(),
            text_config=TINY_TEXT,
            projection_dim=model.config.projection_dim,
        )
        clip = CLIPModel(config).to(model.dtype)
        clip.vision_model.load_state_dict(state)
        clip.save_pretrained(folder)
    else:
        raise ValueError(layout)
    return folder


def write_expert_world(root: Path, num_experts: int = 2, seed: int = 0) -> dict[str, Path]:
    """A tiny base and `num_experts` experts (`tiny_models.make_base_and_experts`) saved under `root` in the v5
    layout, as folders `base`, `task0`, `task1`, ...; returns name -> folder."""
    base, experts = make_base_and_experts(num_experts=num_experts, seed=seed)
    folders = {"base": write_checkpoint(base, root / "base")}
    for name, expert in experts.items():
        folders[name] = write_checkpoint(expert, root / name)
    return folders
