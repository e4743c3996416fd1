"""The WEMoE and E-WEMoE merge methods: task arithmetic outside the routed layers, weight-ensembling MoE layers.

The core, `upscale_tensors`, reads one tensor of each model at a time from any mapping-like source, so the same
code serves the in-memory `build_wemoe` and the streaming `hf-wemoe merge`. Which linear layers are routed is the
config's `moe_modules` (the MLPs by default); with a `rank`, routed task-vector weights become low-rank factors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.io.adapters import AdapterSource
from hf_wemoe.io.sources import CONFIG_METADATA_FIELDS, ModelSource
from hf_wemoe.io.weights import check_finite
from hf_wemoe.merging.base import OVERFLOW_HINT, MergeJob, MergeMethod
from hf_wemoe.merging.static import task_arithmetic, task_vectors
from hf_wemoe.models.configuration_wemoe import (
    ATTENTION_MODULES,
    DEFAULT_MOE_MODULES,
    DEPRECATED_FIELD_NAMES,
    MLP_MODULES,
    MOE_MODULES,
    WEMoECLIPVisionConfig,
)
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.models.wemoe_ops import low_rank_factors, pad_factors
from hf_wemoe.utils.formatting import parse_size

# A tensor getter: the CLIPVisionModel key (transformers 5 layout, no `vision_model.` prefix) -> tensor.
TensorGetter = Callable[[str], torch.Tensor]

# Exact factors of one expert's task vector for a weight key: key -> (A (r, in), B (out, r)) with
# theta_k - theta_0 = B @ A, or None when the expert has no factors for that key (its getter is read instead).
FactorGetter = Callable[[str], tuple[torch.Tensor, torch.Tensor] | None]

_LINEAR_KEY = re.compile(
    rf"^encoder\.layers\.(\d+)\.(self_attn|mlp)\.({'|'.join(MOE_MODULES)})\.(weight|bias)$"
)


def routed_tensor(key: str, moe_modules: Iterable[str] = MLP_MODULES) -> tuple[int, str, str] | None:
    """`(layer index, "self_attn" | "mlp", "q_proj_weight" | ... | "fc2_bias")` for a tensor key of an encoder
    linear layer named in `moe_modules`, else None. Says nothing about which layers are MoE layers."""
    match = _LINEAR_KEY.match(key)
    if match is None or match.group(3) not in set(moe_modules):
        return None
    parent = "self_attn" if match.group(3) in ATTENTION_MODULES else "mlp"
    if match.group(2) != parent:
        return None
    return int(match.group(1)), parent, f"{match.group(3)}_{match.group(4)}"


def is_mlp_tensor(key: str) -> tuple[int, str] | None:
    """`(layer index, "fc1_weight" | ...)` for an encoder MLP tensor key, else None."""
    routed = routed_tensor(key, MLP_MODULES)
    return (routed[0], routed[2]) if routed else None


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


def _expert_factors(
    name: str, key: str, theta0: torch.Tensor, hook: FactorGetter | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The exact factors expert `name`'s hook gives for weight `key` (float32), checked against the base's shape."""
    factors = hook(key) if hook is not None and theta0.dim() == 2 else None
    if factors is None:
        return None
    a, b = (factor.float() for factor in factors)
    out_features, in_features = theta0.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features or (
        a.shape[0] != b.shape[1]
    ):
        raise IncompatibleModelsError(
            f"expert '{name}' gives factors of shapes {tuple(a.shape)} and {tuple(b.shape)} for '{key}', whose "
            f"shape is {tuple(theta0.shape)}; expected A (r, {in_features}) and B ({out_features}, r)"
        )
    return a, b


def upscale_tensors(
    config: WEMoECLIPVisionConfig,
    keys: list[str],
    base: TensorGetter,
    experts: Mapping[str, TensorGetter],
    expert_factors: Mapping[str, FactorGetter] | None = None,
    energies: dict[str, list[float]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(WEMoE key, tensor)` pairs for every base tensor `key`, reading one tensor per model at a time.

    Outside the routed layers: theta0 + lambda * sum_k (theta_k - theta0). In an MoE layer's routed layers (the
    config's `moe_modules`): the pretrained tensor under its own key, and the expert task vectors under
    `encoder.layers.{i}.{mlp|self_attn}.task_vectors.{module}_{weight|bias}`, stacked as float32 (K, *shape); the
    model stores them in its configured dtype and sparsity. With a `rank` R, routed weights yield their factors
    instead: `..._weight_A` (K, R, in) and `..._weight_B` (K, out, R), tau_k ~ B_k @ A_k (`low_rank_factors`,
    one truncated SVD per expert). Routers are not yielded: they are initialised by the model.

    Args:
        expert_factors: expert name -> a hook giving, for a weight key, exact factors `(A (r, in), B (out, r))`
            of that expert's task vector (theta_k - theta0 = B @ A), or None to read the expert's tensor with its
            getter. Routed weights in low-rank mode store hook factors as they are (zero-padded to R, no SVD);
            everywhere else the hook's task vector B @ A is used like a read one.
        energies: filled, in low-rank mode, with `{key: [kept energy per expert]}` for every routed weight: the
            share of the task vector's squared norm its factors keep (1.0 for a hook's exact factors).

    Raises:
        IncompatibleModelsError: an expert's tensor (or factors) does not fit the base's shape (names it).
        WEMoEError: an expert's factors have a larger rank than the config's `rank`.
    """
    moe_layers = set(config.moe_layer_indices)
    scale = float(config.scaling)
    hooks = expert_factors or {}
    for key in keys:
        theta0 = base(key)
        routed = routed_tensor(key, config.moe_modules)
        routed = routed if routed is not None and routed[0] in moe_layers else None
        # Per expert: its exact factors (from its hook) or its tensor (from its getter).
        sources: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = []
        for name, expert in experts.items():
            factors = _expert_factors(name, key, theta0, hooks.get(name))
            if factors is not None:
                sources.append(factors)
                continue
            theta = expert(key)
            if theta.shape != theta0.shape:
                raise IncompatibleModelsError(
                    f"expert '{name}' tensor '{key}' has shape {tuple(theta.shape)}, the base has "
                    f"{tuple(theta0.shape)}; experts must be fine-tuned from the same architecture as the base"
                )
            sources.append(theta)
        if routed is None:
            thetas = [_as_tensor(theta0, source) for source in sources]
            merged = task_arithmetic(theta0, thetas, scale).to(theta0.dtype)
            check_finite(merged, f"the merged tensor '{key}'", OVERFLOW_HINT)
            yield key, merged
            continue
        index, parent, name = routed
        stored = f"encoder.layers.{index}.{parent}.task_vectors.{name}"
        yield key, theta0
        if config.rank is None or theta0.dim() != 2:
            taus = [_as_tensor(theta0, source) for source in sources]
            yield stored, task_vectors(theta0, taus)
            continue
        a_stack, b_stack, kept = [], [], []
        for expert_name, source in zip(experts, sources):
            if isinstance(source, tuple):
                try:
                    a, b = pad_factors(*source, config.rank)
                except ValueError as err:
                    raise WEMoEError(f"expert '{expert_name}' tensor '{key}': {err}") from err
                energy = 1.0
            else:
                a, b, energy = low_rank_factors(source.float() - theta0.float(), config.rank)
            a_stack.append(a)
            b_stack.append(b)
            kept.append(energy)
        if energies is not None:
            energies[key] = kept
        yield f"{stored}_A", torch.stack(a_stack)
        yield f"{stored}_B", torch.stack(b_stack)


def _as_tensor(theta0: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """An expert's tensor: read, or rebuilt (float32) from the base and its exact factors."""
    if isinstance(source, tuple):
        a, b = source
        return theta0.float() + b @ a
    return source


def load_upscaled_tensor(model: WEMoECLIPVisionModel, key: str, tensor: torch.Tensor) -> None:
    """Copy one tensor produced by `upscale_tensors` into `model` (task vectors in the model's storage mode)."""
    if ".task_vectors." in key:
        module_path, name = key.rsplit(".", 1)
        task_vectors = model.get_submodule(module_path)
        if name in task_vectors.shapes:
            task_vectors.set(name, tensor)
            return
        # Low-rank factors (`..._weight_A`, `..._weight_B`) are stored as they are: copied below.
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
            `sparsity=0.9`, `task_vector_dtype="bfloat16"`, `routing="batch"`, `moe_layers=[...]`,
            `moe_modules=["q_proj", "v_proj", "fc1", "fc2"]`, `rank=16`.

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
        rank = self.stored_rank(job)
        config = wemoe_config(
            job.base.config,
            list(job.experts),
            scaling=options.scaling,
            router_depth=options.router_depth,
            shared_router=options.shared_router,
            sparsity=options.sparsity,
            rank=rank,
            moe_modules=list(options.moe_modules or DEFAULT_MOE_MODULES),
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
        own_energies: dict[str, dict[str, float]] = {}
        hooks = self._factor_hooks(job, config, own_energies) if rank is not None else None
        energies: dict[str, list[float]] = {}
        keys = job.base.keys
        for key in job.progress(keys, self.name, len(keys)):
            tensors = upscale_tensors(
                config, [key], job.base.get, experts, expert_factors=hooks, energies=energies
            )
            for name, tensor in tensors:
                load_upscaled_tensor(model, name, tensor)
        if rank is not None:
            model.config.provenance = {
                **(config.provenance or {}),
                "low_rank": self._low_rank_record(job, rank, energies, own_energies),
            }
        # Like `build_wemoe`: the model takes the base checkpoint's dtype (task vectors keep their storage dtype).
        model = model.to(job.base.dtype(keys[0])).eval()
        model.save_pretrained(folder, max_shard_size=parse_size(options.max_shard_size))

    def stored_rank(self, job: MergeJob) -> int | None:
        """The rank the routed task vectors are stored at: max(`rank`, the LoRA experts' ranks), or None (full
        rank) without a rank and without LoRA experts."""
        ranks = [source.rank for source in job.experts.values() if isinstance(source, AdapterSource)]
        if self.options.rank is not None:
            ranks.append(self.options.rank)
        return max(ranks) if ranks else None

    def _factor_hooks(
        self, job: MergeJob, config: WEMoECLIPVisionConfig, energies: dict[str, dict[str, float]]
    ) -> dict[str, FactorGetter]:
        """Per expert, the factors `upscale_tensors` stores for its routed weights instead of an SVD at the stored
        rank: a LoRA expert's own (exact, zero for routed weights it does not adapt, its B·A elsewhere); a full
        fine-tune's truncated to `rank` when that is below the stored rank (their kept energy goes to
        `energies[key][expert]`)."""
        moe_layers = set(config.moe_layer_indices)

        def routed(key: str) -> bool:
            found = routed_tensor(key, config.moe_modules)
            return found is not None and found[0] in moe_layers and key.endswith(".weight")

        def lora_hook(source: AdapterSource) -> FactorGetter:
            def factors(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
                pair = source.factors(key)
                if pair is None and routed(key):
                    out_features, in_features = job.base.shape(key)
                    return torch.zeros(1, in_features), torch.zeros(out_features, 1)
                return pair

            return factors

        def truncated_hook(name: str, source: ModelSource, rank: int) -> FactorGetter:
            def factors(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
                if not routed(key):
                    return None
                delta = source.get(key).float() - job.base.get(key).float()
                a, b, kept = low_rank_factors(delta, rank)
                energies.setdefault(key, {})[name] = kept
                return a, b

            return factors

        hooks: dict[str, FactorGetter] = {}
        stored = self.stored_rank(job)
        for name, source in job.experts.items():
            if isinstance(source, AdapterSource):
                hooks[name] = lora_hook(source)
            elif self.options.rank is not None and self.options.rank < (stored or 0):
                hooks[name] = truncated_hook(name, source, self.options.rank)
        return hooks

    def _low_rank_record(
        self,
        job: MergeJob,
        rank: int,
        energies: dict[str, list[float]],
        own_energies: dict[str, dict[str, float]],
    ) -> dict[str, Any]:
        """`provenance["low_rank"]`: the stored rank, each expert's kind and rank, and per encoder layer the mean
        over its routed weights of the share of each expert's task-vector energy the factors keep."""
        names = list(job.experts)
        per_layer: dict[int, dict[str, list[float]]] = {}
        for key, kept in energies.items():
            layer = int(key.split(".")[2])
            for name, value in zip(names, kept):
                value = own_energies.get(key, {}).get(name, value)
                per_layer.setdefault(layer, {}).setdefault(name, []).append(float(value))
        experts = {
            name: {"kind": "lora", "rank": source.rank}
            if isinstance(source, AdapterSource)
            else {"kind": "full", "rank": self.options.rank or rank}
            for name, source in job.experts.items()
        }
        return {
            "rank": rank,
            "experts": experts,
            "kept_energy": {
                str(layer): {name: sum(values) / len(values) for name, values in by_expert.items()}
                for layer, by_expert in sorted(per_layer.items())
            },
        }


class EWEMoE(WEMoE):
    """E-WEMoE: WEMoE with sparse task vectors (90% removed by default) and one router shared by all layers."""

    name = "e-wemoe"
    summary = "efficient WEMoE: sparse task vectors and a shared router"
    defaults: ClassVar[dict] = {"sparsity": 0.9, "shared_router": True}
    tags = ("wemoe", "e-wemoe", "mixture-of-experts")
