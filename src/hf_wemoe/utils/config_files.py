"""YAML option files and one-line option errors, shared by the typed option models of every command.

Every command's options are pydantic models; a YAML file given with `--config` uses the same names. This module
reads such files (refusing duplicate keys, which plain YAML silently collapses to the last one), writes recipes
back, renames deprecated option names, and turns a validation error into the one line the command line prints.
It imports neither torch nor pydantic at module level, so option handling stays light.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hf_wemoe.errors import WEMoEError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


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
                f"duplicate key {key!r} (option names and the names in a mapping must be unique)",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping of option names to values in a YAML config file.

    Option names may be written as on the command line (`router-depth`) or as fields (`router_depth`); they are
    returned as field names.

    Raises:
        WEMoEError: an unreadable file, invalid YAML, a duplicate key (at any depth), or a file that does not hold
            a mapping; one line each.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as err:
        raise WEMoEError(f"cannot read config file '{path}': {err.strerror or err}") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise WEMoEError(f"invalid YAML in '{path}': {' '.join(str(err).split())}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WEMoEError(
            f"'{path}' must hold a mapping of option names to values, found {type(data).__name__}"
        )
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def dump_yaml(mapping: Mapping[str, Any], header: str = "") -> str:
    """YAML text of a mapping, in its order, with an optional comment header."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(dict(mapping), sort_keys=False, allow_unicode=True)


def flag_of(model: type[BaseModel], name: str) -> str:
    """The command-line flag of field `name`: `--kebab-case`, or the field's own `flag` (e.g. `--expert`)."""
    info = model.model_fields.get(name)
    extra = (info.json_schema_extra if info is not None else None) or {}
    if not isinstance(extra, dict):
        extra = {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def rename_deprecated(
    values: Mapping[str, Any],
    deprecated: Mapping[str, str],
    describe: Callable[[str, str], str] | None = None,
) -> dict[str, Any]:
    """`values` with deprecated option names replaced by their new names, warning once per name.

    `deprecated` maps an old name to its new name; `describe(old, new)` words the warning (a `FutureWarning`).
    Giving both spellings of one option is an error.
    """
    out = dict(values)
    for old, new in deprecated.items():
        if old not in out:
            continue
        if new in out:
            raise WEMoEError(
                f"'{old}' and '{new}' are the same option ('{old}' is its deprecated name); give one"
            )
        message = describe(old, new) if describe else f"option '{old}' is deprecated; use '{new}'"
        warnings.warn(message, FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def describe_validation_error(err: ValidationError, model: type[BaseModel], source: str | None = None) -> str:
    """One line for the first problem of a pydantic error, naming the option by its flag and its field name.

    The same wording serves flags and YAML files: `invalid --scaling (scaling): <problem> (got 'x')`,
    `--base (base) is required`, `unknown option 'lambda'`. `source` (e.g. "config file 'x.yaml'") is named for
    unknown options.
    """
    problem = err.errors()[0]
    location = [str(part) for part in problem.get("loc", ())]
    message = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
    if not location:
        return message
    name = location[0]
    if name not in model.model_fields:
        where = f" in {source}" if source else ""
        return f"unknown option '{name}'{where}; valid options: {', '.join(model.model_fields)}"
    what = f"{flag_of(model, name)} ({name})"
    if problem.get("type") == "missing":
        return f"{what} is required"
    if "input" in problem and problem.get("type") != "value_error":
        return f"invalid {what}: {message} (got {problem['input']!r})"
    return f"invalid {what}: {message}"


__all__ = ["describe_validation_error", "dump_yaml", "flag_of", "load_yaml_mapping", "rename_deprecated"]
