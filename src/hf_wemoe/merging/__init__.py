"""Merge methods, one module per family (static: task arithmetic, averaging, TIES; WEMoE / E-WEMoE), their base
class, the registry and the typed merge recipe."""

from hf_wemoe.merging.wemoe import build_wemoe, is_mlp_tensor, routed_tensor, upscale_tensors, wemoe_config

__all__ = ["build_wemoe", "is_mlp_tensor", "routed_tensor", "upscale_tensors", "wemoe_config"]
