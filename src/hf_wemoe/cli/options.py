"""Typed options shared by command-line flags and YAML config files, so the two cannot drift apart.

A command describes its options once, as a pydantic model with defaults and descriptions. `add_options` turns
every field into a flag (`snake_case` -> `--kebab-case`, help text with the default); `resolve_options` reads
an optional YAML file and lets flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.formatting import first_line


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for `X | None` annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def add_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    exclude: Iterable[str] = (),
    metavars: dict[str, str] | None = None,
    first: Iterable[str] = (),
) -> None:
    """Add one flag per field of `model` (fields named in `first` lead `--help`).

    Flags default to "not given" so that a config file can fill them.
    """
    metavars = metavars or {}
    first = [name for name in first if name in model.model_fields]
    for name in first + [name for name in model.model_fields if name not in first]:
        field = model.model_fields[name]
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        annotation, _ = _unwrap(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "none" if default is None or default == [] or default == {} else default
        help_text = f"{field.description or name} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
            kwargs["type"] = type(kwargs["choices"][0])
        elif origin in (list, tuple):
            kwargs["action"] = "append"
            kwargs["metavar"] = metavars.get(name, name.upper())
        elif origin is dict:
            kwargs["action"] = "append"
            kwargs["metavar"] = metavars.get(name, "NAME=VALUE")
        else:
            kwargs["type"] = annotation if annotation in (int, float, str) else str
            kwargs["metavar"] = metavars.get(name, name.upper())
        parser.add_argument(flag, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a config file, with one-line errors for a missing or malformed file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WEMoEError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WEMoEError(f"config file {path} is not valid YAML: {first_line(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WEMoEError(f"config file {path} must hold a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def resolve_options(
    model: type[BaseModel],
    args: argparse.Namespace,
    config_path: str | Path | None = None,
    convert: dict[str, Any] | None = None,
) -> BaseModel:
    """Build `model` from the YAML file (if any) overridden by flags given on the command line.

    `convert` maps a field name to a function applied to the flag's raw value (e.g. NAME=VALUE lists to a dict).
    """
    values = load_yaml(config_path) if config_path else {}
    for name in model.model_fields:
        if hasattr(args, name):
            raw = getattr(args, name)
            values[name] = convert[name](raw) if convert and name in convert else raw
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "options"
        raise WEMoEError(f"invalid option {where}: {first['msg']}") from err
