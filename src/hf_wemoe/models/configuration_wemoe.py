"""WEMoE CLIP configurations: the vision tower, and a full CLIP model (text tower + WEMoE vision tower).

This file is copied into every saved model folder and Hub repository, so it imports only the standard library
and transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import field
from typing import Literal, get_args

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# The allowed values of the WEMoE fields, defined here once: the Literal types serve typed options (pydantic
# models, type checkers), the tuples serve checks and messages.
RouterDepth = Literal[0, 1, 2]
RoutingMode = Literal["sample", "batch"]
TaskVectorDtype = Literal["float32", "bfloat16", "float16"]
# The linear layers of a CLIP encoder layer that can be routed, in canonical order: the attention projections
# (`self_attn.*`), then the MLP (`mlp.*`).
MoEModule = Literal["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ROUTER_DEPTHS: tuple[int, ...] = get_args(RouterDepth)
ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
TASK_VECTOR_DTYPES: tuple[str, ...] = get_args(TaskVectorDtype)
MOE_MODULES: tuple[str, ...] = get_args(MoEModule)
ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_MODULES: tuple[str, ...] = ("fc1", "fc2")
DEFAULT_MOE_MODULES: tuple[str, ...] = MLP_MODULES


# Fields renamed so that a setting has one name in the config, the merge recipe and the command line. Configs that
# use the old names (every config.json saved by hf-wemoe 0.1) still load, with a FutureWarning.
DEPRECATED_FIELD_NAMES = {"init_lambda": "scaling", "task_vector_sparsity": "sparsity"}


def linear_shapes(config: CLIPVisionConfig) -> dict[str, tuple[int, int]]:
    """The weight shape (out_features, in_features) of every routable linear layer of an encoder layer."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    shapes = {name: (hidden, hidden) for name in ATTENTION_MODULES}
    return {**shapes, "fc1": (intermediate, hidden), "fc2": (hidden, intermediate)}


def check_routing(routing: object) -> None:
    """Raise `ValueError` naming the allowed values unless `routing` is a routing mode."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {list(ROUTING_MODES)}, got {routing!r}")


class WEMoECLIPVisionConfig(CLIPVisionConfig):
    r"""Configuration of a weight-ensembling mixture-of-experts (WEMoE) CLIP vision tower.

    It holds every field of [`CLIPVisionConfig`] (the architecture shared by the pretrained model and its
    fine-tuned experts) plus the fields below.

    Args:
        expert_names (`list[str]`):
            One name per expert (fine-tuned model), in the order of the routing weights. `num_experts` is its length.
        router_depth (`int`, defaults to 2):
            0: a learned vector of routing weights that ignores the input; 1: one linear layer; 2: linear, ReLU,
            linear (the paper's router).
        router_hidden_size (`int`, *optional*):
            Width of the depth-2 router's hidden layer. Defaults to `hidden_size`.
        scaling (`float`, defaults to 0.3):
            Task-arithmetic scaling factor used to merge the non-MLP weights and to initialise the router's output
            bias, so a fresh model routes every expert with weight `scaling`. Formerly `init_lambda` (still
            accepted, deprecated).
        shared_router (`bool`, defaults to `False`):
            Use one router for all MoE layers (E-WEMoE); each layer still feeds it its own tokens.
        sparsity (`float`, defaults to 0.0):
            Fraction of every task-vector tensor removed by magnitude (0 keeps them dense; E-WEMoE uses 0.9). Kept
            entries are stored sparsely as indices and values. Formerly `task_vector_sparsity` (still accepted,
            deprecated).
        task_vector_dtype (`str`, defaults to `"float32"`):
            Storage dtype of the task vectors: `"float32"`, `"bfloat16"` or `"float16"`. Routing and accumulation
            always run in at least float32.
        routing (`str`, defaults to `"sample"`):
            `"sample"`: every input gets its own merged MLP (the paper's method). `"batch"`: routing weights are
            averaged over the batch and one merged MLP serves the whole batch. Switch it with the model's
            `set_routing`, or for one call with the forward's `routing` argument.
        moe_layers (`list[int]`, *optional*):
            Indices of the encoder layers whose MLP is a WEMoE module; `None` means every layer. The other layers
            hold a task-arithmetic MLP.
        moe_modules (`list[str]`, defaults to `["fc1", "fc2"]`):
            The linear layers of every MoE layer that are routed (W0 + sum_k r_k tau_k per input), out of `q_proj`,
            `k_proj`, `v_proj`, `out_proj` (attention) and `fc1`, `fc2` (MLP); stored in that order. Every other
            linear layer holds task-arithmetic weights. One routing vector per input and layer serves all routed
            modules of the layer. When an attention projection is routed, the router reads the states entering
            attention (after `layer_norm1`) and lives at `encoder.layers.{i}.self_attn.router`; otherwise it
            reads the MLP's input (after `layer_norm2`) and lives at `encoder.layers.{i}.mlp.router`. A
            `shared_router` is fed the same states.
        rank (`int`, *optional*):
            Store every routed task-vector weight as its best rank-`rank` factors `B_k A_k` (truncated SVD; `B`
            carries the singular values), which the forward applies as two GEMMs without merging weights per
            input. Biases stay dense. `None` (the default) stores them at full rank, densely or sparsely (see
            `sparsity`). Cannot be combined with `sparsity`; at most min(out, in) of every routed weight.
        base_model_ref (`str`, *optional*):
            Reference (Hub id or path) of the pretrained model the experts were fine-tuned from.
        expert_refs (`list[str]`, *optional*):
            References of the experts, in the order of `expert_names`.
        provenance (`dict`, *optional*):
            Resolved sources (for example commit shas) and the merge recipe, for reproducibility.
    """

    model_type = "wemoe_clip_vision_model"

    expert_names: list[str] = field(default_factory=list)
    router_depth: int = 2
    router_hidden_size: int | None = None
    scaling: float = 0.3
    shared_router: bool = False
    sparsity: float = 0.0
    task_vector_dtype: str = "float32"
    routing: str = "sample"
    moe_layers: list[int] | None = None
    moe_modules: list[str] = field(default_factory=lambda: list(DEFAULT_MOE_MODULES))
    rank: int | None = None
    base_model_ref: str | None = None
    expert_refs: list[str] | None = None
    provenance: dict | None = None

    def __post_init__(self, **kwargs):
        for old, new in DEPRECATED_FIELD_NAMES.items():
            if old in kwargs:
                self._set_from_deprecated_name(old, new, kwargs.pop(old))
        super().__post_init__(**kwargs)
        self.expert_names = list(self.expert_names or [])
        if self.moe_layers is not None:
            self.moe_layers = sorted({int(i) for i in self.moe_layers})
        if self.router_hidden_size is None:
            self.router_hidden_size = self.hidden_size
        if isinstance(self.moe_modules, tuple):
            self.moe_modules = list(self.moe_modules)
        self.validate_wemoe()
        # Canonical order, so that equal sets of modules give equal configs (and key layouts).
        self.moe_modules = [name for name in MOE_MODULES if name in self.moe_modules]

    def _set_from_deprecated_name(self, old: str, new: str, value: object) -> None:
        warnings.warn(
            f"WEMoE config field `{old}` is deprecated, use `{new}` (same meaning); configs saved with `{old}` "
            "still load, and save_pretrained writes the new name",
            FutureWarning,
            stacklevel=4,
        )
        current, default = getattr(self, new), type(self).__dataclass_fields__[new].default
        if current != default and current != value:
            raise ValueError(f"got both `{old}`={value!r} (deprecated) and `{new}`={current!r}; pass only `{new}`")
        setattr(self, new, value)

    @property
    def init_lambda(self) -> float:
        """Deprecated name of `scaling`."""
        warnings.warn("`init_lambda` is deprecated, use `scaling`", FutureWarning, stacklevel=2)
        return self.scaling

    @init_lambda.setter
    def init_lambda(self, value: float) -> None:
        warnings.warn("`init_lambda` is deprecated, use `scaling`", FutureWarning, stacklevel=2)
        self.scaling = value

    @property
    def task_vector_sparsity(self) -> float:
        """Deprecated name of `sparsity`."""
        warnings.warn("`task_vector_sparsity` is deprecated, use `sparsity`", FutureWarning, stacklevel=2)
        return self.sparsity

    @task_vector_sparsity.setter
    def task_vector_sparsity(self, value: float) -> None:
        warnings.warn("`task_vector_sparsity` is deprecated, use `sparsity`", FutureWarning, stacklevel=2)
        self.sparsity = value

    @property
    def num_experts(self) -> int:
        """Number of experts (the length of `expert_names`)."""
        return len(self.expert_names)

    @property
    def routes_attention(self) -> bool:
        """Whether an attention projection is routed (then the router reads the states entering attention)."""
        return any(name in ATTENTION_MODULES for name in self.moe_modules)

    @property
    def moe_layer_indices(self) -> list[int]:
        """The encoder layers that hold a WEMoE MLP, in order."""
        if self.moe_layers is None:
            return list(range(self.num_hidden_layers))
        return list(self.moe_layers)

    def validate_wemoe(self) -> None:
        """Raise `ValueError` naming the field and the allowed values when a WEMoE field is invalid."""
        if len(set(self.expert_names)) != len(self.expert_names):
            raise ValueError(f"expert_names must be unique, got {self.expert_names}")
        if any(not isinstance(name, str) or not name for name in self.expert_names):
            raise ValueError(f"expert_names must be non-empty strings, got {self.expert_names}")
        if self.router_depth not in ROUTER_DEPTHS:
            raise ValueError(f"router_depth must be one of {ROUTER_DEPTHS}, got {self.router_depth!r}")
        if not isinstance(self.router_hidden_size, int) or self.router_hidden_size < 1:
            raise ValueError(
                f"router_hidden_size must be a positive integer, got {self.router_hidden_size!r}"
            )
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"scaling must be a number, got {self.scaling!r}")
        if not isinstance(self.shared_router, bool):
            raise ValueError(f"shared_router must be true or false, got {self.shared_router!r}")
        sparsity = self.sparsity
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number with 0 <= s < 1, got {sparsity!r}")
        if self.task_vector_dtype not in TASK_VECTOR_DTYPES:
            raise ValueError(
                f"task_vector_dtype must be one of {list(TASK_VECTOR_DTYPES)}, got {self.task_vector_dtype!r}"
            )
        check_routing(self.routing)
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"moe_layers must be layer indices in [0, {self.num_hidden_layers - 1}] or null, got {bad}"
                )
        self._validate_moe_modules()
        self._validate_rank()
        if self.expert_refs is not None and len(self.expert_refs) != len(self.expert_names):
            raise ValueError(
                f"expert_refs must have one entry per expert ({len(self.expert_names)}), got {len(self.expert_refs)}"
            )


    def _validate_moe_modules(self) -> None:
        modules = self.moe_modules
        if not isinstance(modules, list) or not modules:
            raise ValueError(f"moe_modules must be a non-empty list of {list(MOE_MODULES)}, got {modules!r}")
        unknown = [name for name in modules if name not in MOE_MODULES]
        if unknown:
            raise ValueError(f"moe_modules must name modules out of {list(MOE_MODULES)}, got unknown {unknown}")
        if len(set(modules)) != len(modules):
            raise ValueError(f"moe_modules must name each module once, got {modules}")

    def _validate_rank(self) -> None:
        rank = self.rank
        if rank is None:
            return
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer or null (full rank), got {rank!r}")
        if self.sparsity > 0:
            raise ValueError(
                f"rank and sparsity are two storage modes; use one (got rank={rank}, sparsity={self.sparsity})"
            )
        shapes = linear_shapes(self)
        for name in self.moe_modules:
            limit = min(shapes[name])
            if rank > limit:
                raise ValueError(
                    f"rank must be at most min(out, in) = {limit} of routed module {name} "
                    f"{shapes[name]}, got {rank}"
                )


class WEMoECLIPConfig(CLIPConfig):
    r"""Configuration of a full CLIP model whose vision tower is a WEMoE vision tower.

    It holds every field of [`CLIPConfig`]: `text_config` is the pretrained model's [`CLIPTextConfig`], and
    `vision_config` is a [`WEMoECLIPVisionConfig`] (the WEMoE fields, expert names and provenance live there).
    `projection_dim` and `logit_scale_init_value` are the pretrained model's. The text tower, the projections and
    `logit_scale` are the pretrained CLIP model's own weights, so text embeddings match the base model's and
    zero-shot classification works like CLIP's.
    """

    model_type = "wemoe_clip"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": WEMoECLIPVisionConfig}


__all__ = [
    "ATTENTION_MODULES",
    "DEFAULT_MOE_MODULES",
    "DEPRECATED_FIELD_NAMES",
    "MLP_MODULES",
    "MOE_MODULES",
    "ROUTER_DEPTHS",
    "MoEModule",
    "ROUTING_MODES",
    "TASK_VECTOR_DTYPES",
    "RouterDepth",
    "RoutingMode",
    "TaskVectorDtype",
    "WEMoECLIPConfig",
    "WEMoECLIPVisionConfig",
    "check_routing",
    "linear_shapes",
]
