"""Tiny CLIP vision models built on the fly: a base and experts fine-tuned from it (by random perturbation)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_wemoe.models.modeling_wemoe import is_router_parameter

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    """A CLIP vision config small enough for per-test construction."""
    return CLIPVisionConfig(**{**TINY_VISION, **overrides})


def make_base_and_experts(
    num_experts: int = 3, seed: int = 0, scale: float = 0.05, **config_overrides
) -> tuple[CLIPVisionModel, dict[str, CLIPVisionModel]]:
    """A random base and `num_experts` experts that differ from it in every tensor (named `task0`, ...)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = tiny_vision_config(**config_overrides)
    base = CLIPVisionModel(config).eval()
    experts = {}
    for k in range(num_experts):
        expert = CLIPVisionModel(config).eval()
        state = {
            name: tensor + scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            for name, tensor in base.state_dict().items()
        }
        expert.load_state_dict(state)
        experts[f"task{k}"] = expert
    return base, experts


def randomize_routers(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Give every router parameter random values so routing is far from the uniform initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_router_parameter(name):
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
