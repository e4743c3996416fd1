"""The WEMoE and E-WEMoE merge methods: upscale a base and its experts into a `WEMoECLIPVisionModel` folder.

The output model is allocated once (its task-vector buffers, dense or sparse, in the storage dtype, are the bulk
of the memory), filled by `upscale_tensors` reading one tensor of every model at a time, and saved with
`save_pretrained`, which writes the config with `auto_map`, the model code files and the (sharded) weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ..modeling_wemoe import WEMoECLIPVisionModel
from .options import parse_size
from .registry import MergeJob, MergeMethod, register
from .wemoe import load_upscaled_tensor, upscale_tensors, wemoe_config


@register
class WEMoE(MergeMethod):
    """Task arithmetic outside the MLPs; every MLP a weight-ensembling mixture of the experts, with a router."""

    name = "wemoe"
    summary = "weight-ensembling mixture of experts: routed MLPs, task arithmetic elsewhere"
    parameters = ("scaling", "router_depth", "sparsity", "shared_router", "routing", "dtype", "seed")
    defaults: ClassVar[dict] = {"sparsity": 0.0, "shared_router": False}
    card_template = "wemoe.md"
    tags = ("wemoe", "mixture-of-experts")

    def write(self, job: MergeJob, folder: Path) -> None:
        options = self.options
        config = wemoe_config(
            job.base.config,
            list(job.experts),
            init_lambda=options.scaling,
            router_depth=options.router_depth,
            shared_router=options.shared_router,
            task_vector_sparsity=options.sparsity,
            task_vector_dtype=options.dtype,
            routing=options.routing,
            base_model_ref=job.base.reference.text,
            expert_refs=[source.reference.text for source in job.experts.values()],
            provenance=job.provenance,
        )
        # The routers are the only random part: a fixed seed makes a recipe rebuild identical weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            model = WEMoECLIPVisionModel(config)
        experts = {name: source.get for name, source in job.experts.items()}
        keys = job.base.keys
        for key in job.progress(keys, self.name, len(keys)):
            for name, tensor in upscale_tensors(config, [key], job.base.get, experts):
                load_upscaled_tensor(model, name, tensor)
        # Like `build_wemoe`: the model takes the base checkpoint's dtype (task vectors keep their storage dtype).
        model = model.to(job.base.dtype(keys[0])).eval()
        model.save_pretrained(folder, max_shard_size=parse_size(options.max_shard_size))


@register
class EWEMoE(WEMoE):
    """E-WEMoE: WEMoE with sparse task vectors (90% removed by default) and one router shared by all layers."""

    name = "e-wemoe"
    summary = "efficient WEMoE: sparse task vectors and a shared router"
    defaults: ClassVar[dict] = {"sparsity": 0.9, "shared_router": True}
    tags = ("wemoe", "e-wemoe", "mixture-of-experts")


__all__ = ["EWEMoE", "WEMoE"]
