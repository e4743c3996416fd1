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
ROUTER_DEPTHS: tuple[int, ...] = get_args(RouterDepth)
ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
TASK_VECTOR_DTYPES: tuple[str, ...] = get_args(TaskVectorDtype)


# Fields renamed so that a setting has one name in the config, the merge recipe and the command line. Configs that
# use the old names (every config.json saved by hf-wemoe 0.1) still load, with a FutureWarning.
DEPRECATED_FIELD_NAMES = {"init_lambda": "scaling", "task_vector_sparsity": "sparsity"}


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
        self.validate_wemoe()

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
        if self.expert_refs is not None and len(self.expert_refs) != len(self.expert_names):
            raise ValueError(
                f"expert_refs must have one entry per expert ({len(self.expert_names)}), got {len(self.expert_refs)}"
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
    "DEPRECATED_FIELD_NAMES",
    "ROUTER_DEPTHS",
    "ROUTING_MODES",
    "TASK_VECTOR_DTYPES",
    "RouterDepth",
    "RoutingMode",
    "TaskVectorDtype",
    "WEMoECLIPConfig",
    "WEMoECLIPVisionConfig",
    "check_routing",
]
