"""The merge recipe: what a merge computes, as one typed object that `merge_config.yaml` holds.

`MergeRecipe` is the base model, the experts, the method and the method's parameters, plus the options that
change the written bytes (`max_shard_size`) or what is read (`allow_pickle`, `full_clip`). A finished merge
writes it back as `merge_config.yaml`, and `hf-wemoe merge --config merge_config.yaml` rebuilds the same weights.
Where the output goes and whether it is pushed are run options of the command, not part of the recipe.

The field names are the names of the same knobs everywhere: the `hf-wemoe merge` flags (`--task-vector-dtype`),
the YAML keys and the WEMoE config fields. Earlier names are accepted with a `FutureWarning` (see
`DEPRECATED_NAMES`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.base import MergeMethod
from hf_wemoe.merging.registry import get_method, merge_methods

# The allowed values are the model config's own, so the recipe cannot accept what the config refuses.
from hf_wemoe.models.configuration_wemoe import (
    DEFAULT_MOE_MODULES,
    MOE_MODULES,
    RouterDepth,
    RoutingMode,
    TaskVectorDtype,
)
from hf_wemoe.utils.config_files import (
    describe_validation_error,
    flag_of,
    load_yaml_mapping,
    rename_deprecated,
)
from hf_wemoe.utils.formatting import parse_size

_EXPERT_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
# Options recorded in merge_config.yaml only when they differ from these values.
_RECORDED_WHEN_SET: dict[str, Any] = {"rank": None, "moe_modules": list(DEFAULT_MOE_MODULES)}


def _method_option(**extra: Any) -> dict[str, Any]:
    return {"method_option": True, **extra}


def parse_expert(text: str) -> tuple[str, str]:
    """`NAME=REF` -> (name, ref)."""
    name, sep, ref = str(text).partition("=")
    if not sep or not name.strip() or not ref.strip():
        raise WEMoEError(
            f"--expert expects NAME=REF (e.g. mnist=tanganke/clip-vit-base-patch32_mnist), got {text!r}"
        )
    return name.strip(), ref.strip()


def experts_from_list(value: Any) -> Any:
    """Experts given as `NAME=REF` strings (flags, YAML lists) -> a name -> ref mapping; mappings pass through.

    A pydantic `mode="before"` validator of every option that lists experts (merge, analyze).
    """
    if isinstance(value, (list, tuple)):
        experts: dict[str, str] = {}
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"expected NAME=REF strings or a NAME: REF mapping, got {item!r}")
            try:
                name, ref = parse_expert(item)
            except WEMoEError as err:
                raise ValueError(str(err)) from None
            if name in experts:
                raise ValueError(f"expert name '{name}' is given twice; expert names must be unique")
            experts[name] = ref
        return experts
    return value


def check_experts(experts: dict[str, str]) -> dict[str, str]:
    """Expert names that are safe everywhere (folder names, config keys) and non-empty references."""
    for name, ref in experts.items():
        if not _EXPERT_NAME.match(name):
            raise ValueError(
                f"expert name {name!r} must start with a letter or digit and contain only letters, digits, "
                "'_', '-' and '.'"
            )
        if not ref.strip():
            raise ValueError(f"expert '{name}' has an empty reference")
    return experts


class MergeRecipe(BaseModel):
    """What a merge computes: sources, method and method options (`merge_config.yaml` holds exactly this).

    Method options (marked in their field metadata) apply only to the methods that declare them; giving one to
    another method is an error. `sparsity` and `shared_router` default to `None`, meaning the method's own
    default (E-WEMoE: 0.9 and true; with a `rank`, sparsity 0). `rank` (low-rank task vectors) and `moe_modules`
    (which linear layers are routed, default fc1 and fc2) are written to `merge_config.yaml` only when set.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {
        "dtype": "task_vector_dtype",
        "init_lambda": "scaling",
        "task_vector_sparsity": "sparsity",
    }
    """Earlier option names (flags, YAML keys, config fields) -> their current names."""

    base: str = Field(
        description="the pretrained model the experts were fine-tuned from: a Hub repo id with an optional "
        "@revision (org/name@revision) or a local folder",
        json_schema_extra={"metavar": "REF", "required": True},
    )
    experts: dict[str, str] = Field(
        default_factory=dict,
        description="an expert as NAME=REF (REF as for --base): a fine-tuned CLIP vision model, or a PEFT LoRA "
        "adapter of the base (a folder or repo with adapter_config.json); repeat once per expert, in routing "
        "order. Given on the command line, these replace the experts of --config",
        json_schema_extra={"flag": "--expert", "metavar": "NAME=REF", "required": True},
    )
    method: str = Field(default="wemoe", description="merge method", json_schema_extra={"metavar": "METHOD"})
    scaling: float = Field(
        default=0.3,
        allow_inf_nan=False,  # a NaN or infinite lambda would write a NaN model
        description="scaling factor lambda of the summed task vectors (task arithmetic, TIES, and WEMoE's "
        "non-MLP weights and router initialisation)",
        json_schema_extra=_method_option(metavar="LAMBDA"),
    )
    router_depth: RouterDepth = Field(
        default=2,
        description="router per MoE layer: 0 a learned vector of routing weights, 1 one linear layer, 2 "
        "linear-ReLU-linear",
        json_schema_extra=_method_option(),
    )
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="fraction of every MLP task vector removed by magnitude; kept entries are stored sparsely",
        json_schema_extra=_method_option(metavar="S"),
    )
    shared_router: bool | None = Field(
        default=None,
        description="one router shared by all MoE layers (each layer still routes its own tokens)",
        json_schema_extra=_method_option(),
    )
    routing: RoutingMode = Field(
        default="sample",
        description="sample: every input gets its own merged MLP; batch: routing weights are averaged over "
        "the batch",
        json_schema_extra=_method_option(),
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        description="store every routed task vector as its best rank-R factors (truncated SVD), applied as two "
        "GEMMs per routed layer without merging weights per input; at most the smaller side of every routed "
        "weight, not with --sparsity (e-wemoe then keeps its shared router and stores no sparse task vectors). "
        "PEFT LoRA experts are stored exactly, as their own factors: a merge with LoRA experts is always low-rank, "
        "with stored rank max(R, the LoRA ranks), and R applies to the full fine-tunes among the experts",
        json_schema_extra=_method_option(
            metavar="R",
            default_text="full rank; with LoRA experts, the largest LoRA rank",
        ),
    )
    moe_modules: list[str] | None = Field(
        default=None,
        description="the linear layers of every encoder layer that are routed, comma-separated, out of "
        f"{','.join(MOE_MODULES)}; the others get task arithmetic. Route the modules your LoRA experts "
        "adapt (e.g. q_proj,v_proj): see `hf-wemoe analyze`",
        json_schema_extra=_method_option(metavar="M1,M2", default_text=",".join(DEFAULT_MOE_MODULES)),
    )
    task_vector_dtype: TaskVectorDtype = Field(
        default="float32",
        description="storage dtype of the task vectors (formerly --dtype)",
        json_schema_extra=_method_option(),
    )
    ties_keep: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="fraction of each expert's task vector TIES keeps (largest magnitudes)",
        json_schema_extra=_method_option(metavar="FRACTION"),
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="seed of the router initialisation, so a recipe rebuilds identical weights",
        json_schema_extra=_method_option(),
    )
    max_shard_size: str = Field(
        default="5GB",
        description="largest safetensors file to write; bigger models are sharded with an index",
        json_schema_extra={"metavar": "SIZE"},
    )
    allow_pickle: bool = Field(
        default=False,
        description="accept checkpoints that only have pickle weights (pytorch_model.bin); unpickling files "
        "from untrusted sources can execute arbitrary code, they are loaded with torch.load(weights_only=True)",
    )
    full_clip: bool = Field(
        default=False,
        description="write a full CLIP model: the base's text tower, projections and tokenizer with the merged "
        "vision tower, for zero-shot image classification pipelines and widgets (the base must be a full CLIP "
        "checkpoint)",
    )

    # ------------------------------------------------------------------------------------------ validation

    @model_validator(mode="before")
    @classmethod
    def _current_names(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return rename_deprecated(values, cls.DEPRECATED_NAMES)
        return values

    @field_validator("experts", mode="before")
    @classmethod
    def _experts_from_list(cls, value: Any) -> Any:
        return experts_from_list(value)

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: dict[str, str]) -> dict[str, str]:
        return check_experts(experts)

    @field_validator("moe_modules", mode="before")
    @classmethod
    def _check_moe_modules(cls, value: Any) -> Any:
        return None if value is None else parse_moe_modules(value)

    @field_validator("method")
    @classmethod
    def _check_method(cls, method: str) -> str:
        try:
            get_method(method)
        except WEMoEError as err:
            raise ValueError(str(err)) from None
        return method

    @field_validator("max_shard_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _check_required(self) -> MergeRecipe:
        if not self.experts:
            raise ValueError("no experts: pass at least one --expert NAME=REF")
        return self

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> MergeRecipe:
        """Validate a mapping of recipe values; errors become one-line `WEMoEError`s naming the option."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise WEMoEError(describe_validation_error(err, cls)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> MergeRecipe:
        """The recipe in a YAML file (e.g. a `merge_config.yaml`), with `overrides` taking precedence."""
        return cls.from_values({**load_yaml_mapping(path), **(overrides or {})})

    @property
    def method_class(self) -> type[MergeMethod]:
        """The registered class of `method`."""
        return get_method(self.method)

    def resolved(self) -> MergeRecipe:
        """Check that every explicitly given method option applies to the method; fill method defaults."""
        method = self.method_class
        given = [
            name for name in self.model_fields_set if is_method_option(name) and name not in method.parameters
        ]
        given = [name for name in given if getattr(self, name) is not None]
        if given:
            uses = ", ".join(flag_of(MergeRecipe, name) for name in method.parameters) or "none"
            verb = "does" if len(given) == 1 else "do"
            raise WEMoEError(
                f"{', '.join(flag_of(MergeRecipe, name) for name in sorted(given))} {verb} not apply to --method "
                f"{self.method} (its options: {uses})"
            )
        if self.rank is not None and self.sparsity:
            raise WEMoEError(
                f"--rank {self.rank} and --sparsity {self.sparsity} are two ways to store task vectors compactly "
                "(low-rank factors, or sparse entries); give one of them"
            )
        updates = {name: value for name, value in method.defaults.items() if getattr(self, name) is None}
        if self.rank is not None and self.sparsity is None and "sparsity" in method.parameters:
            updates["sparsity"] = 0.0  # low-rank task vectors replace the method's sparse ones
        return self.model_copy(update=updates)

    def to_yaml_dict(self, base: str | None = None, experts: dict[str, str] | None = None) -> dict[str, Any]:
        """The recipe as a YAML-ready mapping: sources (optionally pinned), method, the method's options, and
        the options that change the written files.

        Call on resolved recipes so every method option is explicit. `allow_pickle` and `full_clip` appear only
        when on, as in recipes written before `max_shard_size` was recorded.
        """
        recipe: dict[str, Any] = {
            "base": base or self.base,
            "experts": dict(experts or self.experts),
            "method": self.method,
        }
        for name in self.method_class.parameters:
            value = getattr(self, name)
            # Options added after 0.2 appear only when they change the merge, so earlier recipes stay as written.
            if name in _RECORDED_WHEN_SET and value in (None, _RECORDED_WHEN_SET[name]):
                continue
            recipe[name] = value
        recipe["max_shard_size"] = self.max_shard_size
        if self.allow_pickle:
            recipe["allow_pickle"] = True
        if self.full_clip:
            recipe["full_clip"] = True
        return recipe


def parse_moe_modules(value: Any) -> list[str]:
    """`"q_proj,v_proj"`, `["q_proj", "v_proj"]` or repeated flags (`["q_proj,v_proj", "fc1"]`) -> the module
    names in canonical order (attention projections, then the MLP); raises `ValueError` for unknown or repeated
    names or none at all."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected module names separated by commas (e.g. q_proj,v_proj), got {value!r}")
    names = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not names:
        raise ValueError(f"name at least one module out of {','.join(MOE_MODULES)}")
    unknown = [name for name in names if name not in MOE_MODULES]
    if unknown:
        raise ValueError(
            f"unknown module '{unknown[0]}'; routable modules are {','.join(MOE_MODULES)} (e.g. q_proj,v_proj)"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"module '{repeated[0]}' is named twice")
    return [name for name in MOE_MODULES if name in names]


def is_method_option(name: str) -> bool:
    """Whether `name` is a method option (applies only to the methods that list it in `parameters`)."""
    info = MergeRecipe.model_fields.get(name)
    extra = (info.json_schema_extra if info is not None else None) or {}
    return isinstance(extra, dict) and bool(extra.get("method_option"))


def method_option_help(name: str) -> tuple[str, str | None]:
    """For `--help`: the methods that use option `name` (" [wemoe, e-wemoe]") and, for a method-dependent
    default (field default None), each method's default ("0.0 for wemoe, 0.9 for e-wemoe"), else None."""
    if name == "method":
        return ": " + "; ".join(f"{m.name} ({m.summary})" for m in merge_methods().values()), None
    if not is_method_option(name):
        return "", None
    users = [m for m in merge_methods().values() if name in m.parameters]
    note = f" [{', '.join(m.name for m in users)}]"
    extra = MergeRecipe.model_fields[name].json_schema_extra
    if isinstance(extra, dict) and extra.get("default_text"):
        return note, str(extra["default_text"])
    if MergeRecipe.model_fields[name].default is None:
        return note, ", ".join(f"{_format(m.defaults.get(name))} for {m.name}" for m in users)
    return note, None


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


__all__ = [
    "MergeRecipe",
    "check_experts",
    "experts_from_list",
    "is_method_option",
    "method_option_help",
    "parse_expert",
    "parse_moe_modules",
]
