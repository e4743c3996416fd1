"""The options of a merge: one typed model read from command-line flags, a YAML file, or both.

`MergeOptions` is the single definition: the `hf-wemoe merge` flags are generated from its fields (names, types,
choices, help and defaults), `--config FILE.yaml` takes the same field names, and a finished merge writes its
recipe back as the same YAML (`merge_config.yaml`). Flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.base import MergeMethod
from hf_wemoe.merging.registry import get_method, merge_methods
from hf_wemoe.utils.formatting import parse_size

_EXPERT_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")



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


class MergeOptions(BaseModel):
    """Options of `hf-wemoe merge`, shared by its flags, `--config FILE.yaml` and the saved `merge_config.yaml`.

    Method options (marked in their field metadata) apply only to the methods that declare them; giving one to
    another method is an error. `sparsity` and `shared_router` default to `None`, meaning the method's own
    default (E-WEMoE: 0.9 and true).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base: str = Field(
        description="the pretrained model the experts were fine-tuned from: a Hub repo id with an optional "
        "@revision (org/name@revision) or a local folder",
        json_schema_extra={"metavar": "REF", "required": True},
    )
    experts: dict[str, str] = Field(
        default_factory=dict,
        description="a fine-tuned expert as NAME=REF (REF as for --base); repeat once per expert, in routing "
        "order. Given on the command line, these replace the experts of --config",
        json_schema_extra={"flag": "--expert", "metavar": "NAME=REF", "required": True},
    )
    output: Path | None = Field(
        default=None,
        description="folder to write the merged model to (written beside it under a temporary name and "
        "renamed when complete)",
        json_schema_extra={"metavar": "DIR", "required": True},
    )
    method: str = Field(default="wemoe", description="merge method", json_schema_extra={"metavar": "METHOD"})
    scaling: float = Field(
        default=0.3,
        allow_inf_nan=False,  # a NaN or infinite lambda would write a NaN model
        description="scaling factor lambda of the summed task vectors (task arithmetic, TIES, and WEMoE's "
        "non-MLP weights and router initialisation)",
        json_schema_extra=_method_option(metavar="LAMBDA"),
    )
    router_depth: Literal[0, 1, 2] = Field(
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
    routing: Literal["sample", "batch"] = Field(
        default="sample",
        description="sample: every input gets its own merged MLP; batch: routing weights are averaged over "
        "the batch",
        json_schema_extra=_method_option(),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="storage dtype of the task vectors",
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
    overwrite: bool = Field(default=False, description="replace the output folder if it exists")
    full_clip: bool = Field(
        default=False,
        description="write a full CLIP model: the base's text tower, projections and tokenizer with the merged "
        "vision tower, for zero-shot image classification pipelines and widgets (the base must be a full CLIP "
        "checkpoint)",
    )
    push_to_hub: str | None = Field(
        default=None,
        description="after merging, push the output folder to this Hub model repo (created when missing) in one "
        "commit, with a model card",
        json_schema_extra={"metavar": "ORG/NAME"},
    )
    private: bool = Field(default=False, description="create the --push-to-hub repo as private")

    # ------------------------------------------------------------------------------------------ validation

    @field_validator("experts", mode="before")
    @classmethod
    def _experts_from_list(cls, value: Any) -> Any:
        # The YAML file may list experts as NAME=REF strings, like the flags.
        if isinstance(value, (list, tuple)):
            experts: dict[str, str] = {}
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"expected NAME=REF strings or a NAME: REF mapping, got {item!r}")
                name, ref = parse_expert(item)
                if name in experts:
                    raise ValueError(f"expert name '{name}' is given twice; expert names must be unique")
                experts[name] = ref
            return experts
        return value

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: dict[str, str]) -> dict[str, str]:
        for name, ref in experts.items():
            if not _EXPERT_NAME.match(name):
                raise ValueError(
                    f"expert name {name!r} must start with a letter or digit and contain only letters, digits, "
                    "'_', '-' and '.'"
                )
            if not ref.strip():
                raise ValueError(f"expert '{name}' has an empty reference")
        return experts

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
    def _check_required(self) -> MergeOptions:
        if not self.experts:
            raise ValueError("no experts: pass at least one --expert NAME=REF")
        return self

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> MergeOptions:
        """Validate a mapping of option values; errors become one-line `WEMoEError`s naming the option."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise WEMoEError(_describe_validation_error(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> MergeOptions:
        """Options from a YAML file (same field names), with `overrides` taking precedence."""
        return cls.from_values({**load_yaml(path), **(overrides or {})})

    @property
    def method_class(self) -> type[MergeMethod]:
        """The registered class of `method`."""
        return get_method(self.method)

    def resolved(self) -> MergeOptions:
        """Check that every explicitly given method option applies to the method; fill method defaults."""
        method = self.method_class
        given = [
            name
            for name in self.model_fields_set
            if _is_method_option(name) and name not in method.parameters
        ]
        given = [name for name in given if getattr(self, name) is not None]
        if given:
            uses = ", ".join(_flag(name) for name in method.parameters) or "none"
            verb = "does" if len(given) == 1 else "do"
            raise WEMoEError(
                f"{', '.join(_flag(name) for name in sorted(given))} {verb} not apply to --method "
                f"{self.method} (its options: {uses})"
            )
        updates = {name: value for name, value in method.defaults.items() if getattr(self, name) is None}
        return self.model_copy(update=updates)

    def recipe(self, base: str | None = None, experts: dict[str, str] | None = None) -> dict[str, Any]:
        """The merge as a YAML-ready mapping: sources (optionally pinned), method, and the method's options.

        Only what determines the weights is kept (not the output folder or where it is pushed); call on resolved
        options so every method option is explicit.
        """
        recipe: dict[str, Any] = {
            "base": base or self.base,
            "experts": dict(experts or self.experts),
            "method": self.method,
        }
        for name in self.method_class.parameters:
            recipe[name] = getattr(self, name)
        if self.allow_pickle:
            recipe["allow_pickle"] = True
        if self.full_clip:
            recipe["full_clip"] = True
        return recipe


# ----------------------------------------------------------------------------------------------------------------
# YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys (the default silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (expert names and options must be unique)",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a merge config file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except OSError as err:
        raise WEMoEError(f"cannot read config file '{path}': {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise WEMoEError(f"invalid YAML in '{path}': {' '.join(str(err).split())}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WEMoEError(f"'{path}' must hold a mapping of merge options, found {type(data).__name__}")
    # Option names may be written as on the command line (router-depth) or as fields (router_depth).
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def dump_yaml(recipe: dict[str, Any], header: str = "") -> str:
    """YAML text of a recipe, in field order, with an optional comment header."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _is_method_option(name: str) -> bool:
    extra = MergeOptions.model_fields[name].json_schema_extra or {}
    return bool(extra.get("method_option"))


def _flag(name: str) -> str:
    extra = MergeOptions.model_fields[name].json_schema_extra or {}
    return extra.get("flag", "--" + name.replace("_", "-"))


def _plain_type(annotation: Any) -> Any:
    """The annotation without `None` (for `X | None`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _default_text(name: str) -> str:
    """The default shown in --help; for method-dependent defaults, each method's."""
    info = MergeOptions.model_fields[name]
    if info.is_required() or (info.json_schema_extra or {}).get("required"):
        return "required, as a flag or in --config"
    if info.default is None and _is_method_option(name):
        values = [
            f"{_format(method.defaults.get(name))} for {method.name}"
            for method in merge_methods().values()
            if name in method.parameters
        ]
        return ", ".join(values)
    return _format(info.default)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help(name: str) -> str:
    info = MergeOptions.model_fields[name]
    text = info.description or ""
    if name == "method":
        text += ": " + "; ".join(f"{m.name} ({m.summary})" for m in merge_methods().values())
    if _is_method_option(name):
        users = [m.name for m in merge_methods().values() if name in m.parameters]
        text += f" [{', '.join(users)}]"
    default = _default_text(name)
    suffix = f"({default})" if default.startswith("required") else f"(default: {default})"
    return f"{text} {suffix}".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `MergeOptions` field (plus `--config`) to `parser`.

    Every flag defaults to "not given" so that `options_from_args` can tell given flags from file values.
    """
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="read options from a YAML file with the same names (base, experts as NAME: REF, method, scaling, "
        "...), e.g. the merge_config.yaml of a merged model; flags given here override it",
    )
    for name, info in MergeOptions.model_fields.items():
        extra = info.json_schema_extra or {}
        kind = _plain_type(info.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(name)}
        if name == "experts":
            kwargs.update(action="append", metavar=extra["metavar"])
        elif kind is bool:
            # Tri-state options (default None) get --x/--no-x; plain switches only --x.
            kwargs["action"] = argparse.BooleanOptionalAction if info.default is None else "store_true"
        elif typing.get_origin(kind) is Literal:
            choices = list(typing.get_args(kind))
            kwargs.update(choices=choices, type=type(choices[0]))
        elif name == "method":
            kwargs.update(choices=list(merge_methods()))
        else:
            kwargs.update(type=kind if kind in (int, float) else str, metavar=extra.get("metavar"))
        parser.add_argument(_flag(name), **kwargs)


def options_from_args(args: argparse.Namespace) -> MergeOptions:
    """`MergeOptions` from parsed flags, over the values of `--config` when given."""
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = {name: getattr(args, name) for name in MergeOptions.model_fields if hasattr(args, name)}
    if "experts" in given:
        experts: dict[str, str] = {}
        for item in given["experts"]:
            name, ref = parse_expert(item)
            if name in experts:
                raise WEMoEError(f"expert name '{name}' is given twice; expert names must be unique")
            experts[name] = ref
        given["experts"] = experts
    values.update(given)
    if "base" not in values:
        raise WEMoEError(
            "no base model: pass --base REF (the pretrained model the experts were fine-tuned from)"
        )
    return MergeOptions.from_values(values)


def _describe_validation_error(err: ValidationError) -> str:
    """One line for the first problem of a pydantic error, naming the option as a flag."""
    problem = err.errors()[0]
    location = [str(part) for part in problem.get("loc", ())]
    message = problem.get("msg", "invalid value").removeprefix("Value error, ")
    if not location:
        return message
    name = location[0]
    if name not in MergeOptions.model_fields:
        return f"unknown option '{name}'; valid options: {', '.join(MergeOptions.model_fields)}"
    what = f"{_flag(name)} ({name})" if name != "experts" else "--expert (experts)"
    if problem.get("type") == "missing":
        return f"{what} is required"
    if "input" in problem and problem.get("type") != "value_error":
        return f"invalid {what}: {message} (got {problem['input']!r})"
    return f"invalid {what}: {message}"


__all__ = ["MergeOptions", "add_arguments", "dump_yaml", "load_yaml", "options_from_args", "parse_size"]
