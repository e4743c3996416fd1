"""The WEMoE and E-WEMoE merge methods: task arithmetic outside the MLPs, weight-ensembling MoE MLPs.

The core, `upscale_tensors`, reads one tensor of each model at a time from any mapping-like source, so the same
code serves the in-memory `build_wemoe` and the streaming `hf-wemoe merge`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.io.sources import CONFIG_METADATA_FIELDS
from hf_wemoe.io.weights import check_finite
from hf_wemoe.merging.base import OVERFLOW_HINT, MergeJob, MergeMethod
from hf_wemoe.merging.static import task_arithmetic, task_vectors
from hf_wemoe.models.configuration_wemoe import DEPRECATED_FIELD_NAMES, WEMoECLIPVisionConfig
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.utils.formatting import parse_size

# A tensor getter: the CLIPVisionModel key (transformers 5 layout, no `vision_model.` prefix) -> tensor.
TensorGetter = Callable[[str], torch.Tensor]

_MLP_KEY = re.compile(r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$")


def is_mlp_tensor(key: str) -> tuple[int, str] | None:
    """`(layer index, "fc1_weight" | ...)` for an encoder MLP tensor key, else None."""
    match = _MLP_KEY.match(key)
    return (int(match.group(1)), f"{match.group(2)}_{match.group(3)}") if match else None


def wemoe_config(base_config: CLIPVisionConfig, expert_names: list[str], **options) -> WEMoECLIPVisionConfig:
    """The WEMoE config for a base architecture, expert names and WEMoE options (config field names).

    Unknown option names raise `WEMoEError`; invalid values raise it with the config's message. The deprecated
    names of renamed fields (`init_lambda`, `task_vector_sparsity`) still work, with a FutureWarning.
    """
    fields = set(WEMoECLIPVisionConfig.__dataclass_fields__) - set(CLIPVisionConfig.__dataclass_fields__)
    unknown = sorted(set(options) - fields - set(DEPRECATED_FIELD_NAMES))
    if unknown:
        raise WEMoEError(
            f"unknown WEMoE option(s) {unknown}; valid options: {sorted(fields - {'expert_names'})}"
        )
    architecture = {
        k: v for k, v in base_config.to_dict().items() if k in CLIPVisionConfig.__dataclass_fields__
    }
    # The model takes the checkpoint's dtype when it is built, not a dtype recorded in its config.
    for key in (*CONFIG_METADATA_FIELDS, "dtype"):
        architecture.pop(key, None)
    try:
        return WEMoECLIPVisionConfig(**architecture, expert_names=list(expert_names), **options)
    except ValueError as err:
        raise WEMoEError(str(err)) from err


def upscale_tensors(
    config: WEMoECLIPVisionConfig,
    keys: list[str],
    base: TensorGetter,
    experts: Mapping[str, TensorGetter],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(WEMoE key, tensor)` pairs for every base tensor `key`, reading one tensor per model at a time.

    Outside the MoE MLPs: theta0 + lambda * sum_k (theta_k - theta0). In an MoE layer's MLP: the pretrained
    tensor under its own key, and the stacked expert task vectors (float32 (K, *shape)) under
    `encoder.layers.{i}.mlp.task_vectors.{fc1_weight,...}`; the model stores them in its configured dtype and
    sparsity. Routers are not yielded: they are initialised by the model.
    """
    moe_layers = set(config.moe_layer_indices)
    scale = float(config.scaling)
    for key in keys:
        theta0 = base(key)
        thetas = []
        for name, expert in experts.items():
            theta = expert(key)
            if theta.shape != theta0.shape:
                raise IncompatibleModelsError(
                    f"expert '{name}' tensor '{key}' has shape {tuple(theta.shape)}, the base has "
                    f"{tuple(theta0.shape)}; experts must be fine-tuned from the same architecture as the base"
                )
            thetas.append(theta)
        mlp = is_mlp_tensor(key)
        if mlp is not None and mlp[0] in moe_layers:
            yield key, theta0
            yield f"encoder.layers.{mlp[0]}.mlp.task_vectors.{mlp[1]}", task_vectors(theta0, thetas)
        else:
            merged = task_arithmetic(theta0, thetas, scale).to(theta0.dtype)
            check_finite(merged, f"the merged tensor '{key}'", OVERFLOW_HINT)
            yield key, merged


def load_upscaled_tensor(model: WEMoECLIPVisionModel, key: str, tensor: torch.Tensor) -> None:
    """Copy one tensor produced by `upscale_tensors` into `model`."""
    if ".mlp.task_vectors." in key:
        module_path, name = key.rsplit(".", 1)
        model.get_submodule(module_path).set(name, tensor)
        return
    target = model.get_parameter(key) if key in dict(model.named_parameters()) else model.get_buffer(key)
    with torch.no_grad():
        target.copy_(tensor)


def build_wemoe(
    base: CLIPVisionModel,
    experts: Mapping[str, CLIPVisionModel],
    seed: int = 0,
    **options,
) -> WEMoECLIPVisionModel:
    """Build a [`WEMoECLIPVisionModel`] from an in-memory base and fine-tuned experts.

    Args:
        base: the pretrained `CLIPVisionModel`.
        experts: expert name -> `CLIPVisionModel` fine-tuned from `base`.
        seed: seed of the router initialisation (the only random part), for reproducible builds.
        **options: WEMoE config fields, e.g. `scaling=0.3`, `router_depth=2`, `shared_router=True`,
            `sparsity=0.9`, `task_vector_dtype="bfloat16"`, `routing="batch"`, `moe_layers=[...]`.

    Raises:
        WEMoEError: no experts, or invalid options.
        IncompatibleModelsError: an expert's tensors differ from the base's (names the tensor).
    """
    if not experts:
        raise WEMoEError("no experts given: pass at least one fine-tuned model to merge")
    base_state = base.state_dict()
    expert_states = {name: model.state_dict() for name, model in experts.items()}
    for name, state in expert_states.items():
        missing = sorted(set(base_state) - set(state))
        extra = sorted(set(state) - set(base_state))
        if missing or extra:
            what = f"lacks tensor '{missing[0]}'" if missing else f"has unexpected tensor '{extra[0]}'"
            raise IncompatibleModelsError(
                f"expert '{name}' {what}; experts must share the base's architecture"
            )
    config = wemoe_config(base.config, list(experts), **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WEMoECLIPVisionModel(config)
    getters = {name: state.__getitem__ for name, state in expert_states.items()}
    for key, tensor in upscale_tensors(config, list(base_state), base_state.__getitem__, getters):
        load_upscaled_tensor(model, key, tensor)
    return model.to(base.dtype).eval()


class WEMoE(MergeMethod):
    """Task arithmetic outside the MLPs; every MLP a weight-ensembling mixture of the experts, with a router."""

    name = "wemoe"
    summary = "weight-ensembling mixture of experts: routed MLPs, task arithmetic elsewhere"
    parameters = (
        "scaling",
        "router_depth",
        "sparsity",
        "rank",
        "moe_modules",
        "shared_router",
        "routing",
        "task_vector_dtype",
        "seed",
    )
    defaults: ClassVar[dict] = {"sparsity": 0.0, "shared_router": False}
    card_template = "wemoe.md"
    tags = ("wemoe", "mixture-of-experts")
    is_moe = True

    def write(self, job: MergeJob, folder: Path) -> None:
        options = self.options
        config = wemoe_config(
            job.base.config,
            list(job.experts),
            scaling=options.scaling,
            router_depth=options.router_depth,
            shared_router=options.shared_router,
            sparsity=options.sparsity,
            task_vector_dtype=options.task_vector_dtype,
            routing=options.routing,
            base_model_ref=job.base.reference.recorded,
            expert_refs=[source.reference.recorded for source in job.experts.values()],
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


class EWEMoE(WEMoE):
    """E-WEMoE: WEMoE with sparse task vectors (90% removed by default) and one router shared by all layers."""

    name = "e-wemoe"
    summary = "efficient WEMoE: sparse task vectors and a shared router"
    defaults: ClassVar[dict] = {"sparsity": 0.9, "shared_router": True}
    tags = ("wemoe", "e-wemoe", "mixture-of-experts")
