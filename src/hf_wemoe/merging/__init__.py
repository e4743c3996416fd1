"""Merge recipes over a shared tensor source: WEMoE/E-WEMoE upscaling and static baselines."""

from .wemoe import build_wemoe, is_mlp_tensor, upscale_tensors, wemoe_config

__all__ = ["build_wemoe", "is_mlp_tensor", "upscale_tensors", "wemoe_config"]
