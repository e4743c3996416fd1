"""The models under test, at real CLIP shapes with random weights: WEMoE (per-sample or batch routing), the
static model it collapses to, and E-WEMoE-90% with the same pretrained weights and task vectors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from benchmarks.settings import LAMBDA, NUM_EXPERTS, ROUTER_STD, SHAPES, TASK_VECTOR_STD
from hf_wemoe.merging.wemoe import wemoe_config
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel, is_router_parameter


def base_config(shape: str) -> CLIPVisionConfig:
    """The CLIP vision config of `shape` (a key of `SHAPES`)."""
    return CLIPVisionConfig(**SHAPES[shape], hidden_act="quick_gelu")


def base_config_of(model: WEMoECLIPVisionModel) -> CLIPVisionConfig:
    """The CLIP vision config a WEMoE model was upscaled from (its CLIP fields, without the WEMoE ones)."""
    fields = CLIPVisionConfig().to_dict()
    values = {k: v for k, v in model.config.to_dict().items() if k in fields}
    for key in ("model_type", "transformers_version", "architectures", "dtype"):
        values.pop(key, None)
    return CLIPVisionConfig(**values)


def expert_names() -> list[str]:
    """The names of the `NUM_EXPERTS` experts: task0, task1, ..."""
    return [f"task{k}" for k in range(NUM_EXPERTS)]


def _fresh(shape: str, seed: int, **options: Any) -> tuple[WEMoECLIPVisionModel, torch.Generator]:
    """A freshly initialised WEMoE model at `shape` (seeded), and the generator its task vectors are drawn from."""
    config = wemoe_config(base_config(shape), expert_names(), scaling=LAMBDA, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WEMoECLIPVisionModel(config)
    return model, torch.Generator().manual_seed(seed + 1)


def make_wemoe(shape: str, seed: int = 0, **options: Any) -> WEMoECLIPVisionModel:
    """A WEMoE model at `shape` with random weights: CLIP init, random task vectors and varied routers."""
    model, generator = _fresh(shape, seed, **options)
    with torch.no_grad():
        for mlp in model.moe_layers:
            for name, shape_ in mlp.task_vectors.shapes.items():
                mlp.task_vectors.set(
                    name, TASK_VECTOR_STD * torch.randn(NUM_EXPERTS, *shape_, generator=generator)
                )
        randomize_routers(model, seed + 2)
    return model.eval()


def make_low_rank(shape: str, rank: int, seed: int = 0) -> WEMoECLIPVisionModel:
    """A low-rank WEMoE model at `shape` (`rank` R): random factors whose products have about the task vectors'
    magnitude, random bias task vectors and varied routers. Built directly from factors (no dense task vectors,
    no SVD), so its memory is its own; speed and size do not depend on the values."""
    model, generator = _fresh(shape, seed, rank=rank)
    with torch.no_grad():
        for mlp in model.moe_layers:
            vectors = mlp.task_vectors
            for name, shape_ in vectors.shapes.items():
                if vectors.is_factorised(name):
                    out_features, in_features = shape_
                    a = torch.randn(NUM_EXPERTS, rank, in_features, generator=generator) / in_features**0.5
                    b = TASK_VECTOR_STD * torch.randn(NUM_EXPERTS, out_features, rank, generator=generator)
                    vectors.set_factors(name, a, b * (in_features / rank) ** 0.5)
                else:
                    vectors.set(name, TASK_VECTOR_STD * torch.randn(NUM_EXPERTS, *shape_, generator=generator))
        randomize_routers(model, seed + 2)
    return model.eval()


def make_static(wemoe: WEMoECLIPVisionModel) -> CLIPVisionModel:
    """The static baseline: `wemoe` collapsed at routing weights lambda (task arithmetic, a plain CLIP model)."""
    return wemoe.collapse(torch.full((NUM_EXPERTS,), LAMBDA)).eval()


def make_sparse_like(dense: WEMoECLIPVisionModel, sparsity: float = 0.9) -> WEMoECLIPVisionModel:
    """E-WEMoE: the same pretrained weights and task vectors, pruned and stored sparsely, one shared router."""
    config = wemoe_config(
        base_config_of(dense),
        expert_names(),
        scaling=LAMBDA,
        shared_router=True,
        sparsity=sparsity,
    )
    model = WEMoECLIPVisionModel(config)
    state = {k: v for k, v in dense.state_dict().items() if ".task_vectors." not in k and not is_router_parameter(k)}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for source, target in zip(dense.moe_layers, model.moe_layers):
            for name in source.task_vectors.shapes:
                target.task_vectors.set(name, source.task_vectors.dense(name))
        randomize_routers(model, 7)
    return model.eval()


def randomize_routers(model: nn.Module, seed: int) -> None:
    """Routers far enough from their initialisation that every sample gets its own routing weights."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if is_router_parameter(name):
            noise = ROUTER_STD * torch.randn(parameter.shape, generator=generator)
            parameter.copy_((LAMBDA if name.endswith("output.bias") else 0.0) + noise)


def set_routing(model: WEMoECLIPVisionModel, mode: str) -> str:
    """Route per sample ("sample") or per batch ("batch") from now on; the previous mode."""
    previous = model.config.routing
    model.set_routing(mode)
    return previous


@contextlib.contextmanager
def routing_mode(model: WEMoECLIPVisionModel, mode: str) -> Iterator[WEMoECLIPVisionModel]:
    """Switch a model between per-sample and batch routing for a block, without copying it."""
    previous = set_routing(model, mode)
    try:
        yield model
    finally:
        set_routing(model, previous)


def pixel_values(shape: str, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images of `shape`'s size, the same for the same seed."""
    size = SHAPES[shape]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
