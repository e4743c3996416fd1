"""One bridge from typed options to the command line and YAML files, used by every ``hf-wemoe`` command.

A command describes its options once, as pydantic models with defaults and descriptions (the merge recipe, the
training config, ...). `add_options` turns every field into a flag: ``snake_case`` becomes ``--kebab-case``
(the underscore spelling is accepted too), the help text states the default once, booleans get ``--x/--no-x``.
`resolve_options` reads the optional ``--config FILE.yaml`` (same names; duplicate keys refused), lets the flags
given on the command line override it, and validates everything with the models, so a bad value reads the same
whether it came from a flag or from the file. Deprecated option names still work with a one-line warning.

Parsers never abbreviate flags (``--out`` is not ``--output``), and every parse error is one line, exit code 2.
Nothing here imports torch, transformers or pydantic at module level: the top-level parser must answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.config_files import (
    describe_validation_error,
    flag_of,
    load_yaml_mapping,
    rename_deprecated,
)

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo


class UsageError(WEMoEError):
    """A command line that cannot be parsed: unknown command or flag, missing value."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples keep their line breaks; flag help is wrapped."""

    def __init__(self, prog: str, **kwargs: Any):
        kwargs.setdefault("max_help_position", 32)
        super().__init__(prog, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never break inside a flag or a value such as `--push-to-hub` or `e-wemoe`.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def normalize_flags(args: Sequence[str]) -> list[str]:
    """`--max_shard_size` -> `--max-shard-size` (flags are kebab-case; the underscore spelling is an alias).

    Only the flag part of a token is changed (not a value after `=`), and nothing after a bare `--`.
    """
    out: list[str] = []
    for index, token in enumerate(args):
        if token == "--":
            out.extend(args[index:])
            break
        if token.startswith("--") and "_" in token.partition("=")[0]:
            flag, equals, value = token.partition("=")
            token = flag.replace("_", "-") + equals + value
        out.append(token)
    return out


class OptionParser(argparse.ArgumentParser):
    """An argument parser with the command line's conventions: no abbreviations, one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(normalize_flags(list(args)), namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Suggest from the options of the command that was parsed (set by the command line's main).
            target = getattr(parsed, "_parser", None) or self
            raise UsageError(target.unknown_argument(extras[0]))
        return parsed

    def unknown_argument(self, token: str) -> str:
        """The one-line message for an argument this parser does not know, with a close match if any."""
        hint = f"see '{self.prog} --help'"
        if not token.startswith("-"):
            return f"unexpected argument '{token}'; {hint}"
        flag = token.partition("=")[0]
        close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1, cutoff=0.6)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown option '{flag}'{suggestion}; {hint}"

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


# ----------------------------------------------------------------------------------------------------------------
# Flags from models


def add_logging_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """`-q/--quiet` and `-v/--verbose`, accepted before and after the command name alike.

    Below the top level they default to "not given", so they never reset a value given before the command.
    """
    default: Any = False if top_level else argparse.SUPPRESS
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or progress lines (default: off)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="show the package's debug logging; other libraries stay at warnings (default: off)",
    )


def add_config_option(parser: argparse.ArgumentParser, example: str = "") -> None:
    """`--config FILE.yaml`: the command's options from a YAML file, under the same names as the flags."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="read options from a YAML file that uses the flags' names (router_depth or router-depth)"
        + (f", {example}" if example else "")
        + "; flags given here override it",
    )


def _unwrap(annotation: Any) -> Any:
    """The annotation without `None` (for `X | None`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _lenient(kind: type) -> typing.Callable[[str], Any]:
    """Convert a flag's text to `kind` when it can; otherwise pass the text on, so that the model reports the bad
    value in the same words as for a YAML file."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == [] or value == {}:
        return "none"
    return str(value)


def _help(
    info: FieldInfo, note: str, default_text: str | None, accepts_config: bool, positional: bool = False
) -> str:
    extra = _extra(info)
    text = (info.description or "") + note
    if extra.get("required") or info.is_required():
        suffix = "(required, as a flag or in --config)" if accepts_config and not positional else "(required)"
    else:
        shown = (
            default_text or extra.get("default_text") or _show(info.get_default(call_default_factory=True))
        )
        suffix = f"(default: {shown})"
    return f"{text} {suffix}".strip().replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser,
    models: Sequence[type[BaseModel]],
    *,
    first: Iterable[str] = (),
    notes: Mapping[str, str] | None = None,
    default_texts: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of `models` (fields named in `first` lead `--help`).

    Args:
        parser: the command's parser; when it has `--config`, required fields say "as a flag or in --config".
        models: the pydantic models whose fields become flags; field metadata (`json_schema_extra`) may give a
            `flag` (instead of `--kebab-case`), a `metavar`, `required` (checked later, shown in help),
            `default_text` (the default in words) and `positional`.
        first: field names listed first in `--help`.
        notes: text appended to a field's description (e.g. which methods use it).
        default_texts: the default in words, for defaults that depend on other options.

    Every flag defaults to "not given", so `resolve_options` can tell flags from file values. Deprecated names
    (a model's `DEPRECATED_NAMES`, old -> new) are accepted as hidden flags.
    """
    notes = notes or {}
    default_texts = default_texts or {}
    accepts_config = "--config" in parser._option_string_actions
    fields: dict[str, tuple[type[BaseModel], FieldInfo]] = {}
    for model in models:
        for name, info in model.model_fields.items():
            if name in fields:
                raise ValueError(
                    f"option {name!r} is a field of both {fields[name][0].__name__} and {model.__name__}"
                )
            fields[name] = (model, info)
    order = [name for name in first if name in fields] + [name for name in fields if name not in first]
    for name in order:
        model, info = fields[name]
        extra = _extra(info)
        help_text = _help(
            info, notes.get(name, ""), default_texts.get(name), accepts_config, bool(extra.get("positional"))
        )
        kwargs = _argument_kwargs(name, info)
        if extra.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(name, help=help_text, **kwargs)
            continue
        parser.add_argument(flag_of(model, name), help=help_text, **kwargs)
        for old, new in getattr(model, "DEPRECATED_NAMES", {}).items():
            if new == name:
                parser.add_argument(
                    "--" + old.replace("_", "-"), **{**_argument_kwargs(old, info), "help": argparse.SUPPRESS}
                )


def _argument_kwargs(dest: str, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords for a field: its action, conversion and metavar (values are validated by the model)."""
    extra = _extra(info)
    kind = _unwrap(info.annotation)
    origin = typing.get_origin(kind)
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    if extra.get("positional"):
        kwargs.update(metavar=extra.get("metavar", dest.upper()))
    elif kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(kind)
        kwargs.update(metavar="{" + ",".join(str(c) for c in choices) + "}", type=_lenient(type(choices[0])))
    elif origin in (list, tuple):
        kwargs.update(action="append", metavar=extra.get("metavar", dest.upper()))
    elif origin is dict:
        kwargs.update(action="append", metavar=extra.get("metavar", "NAME=VALUE"))
    else:
        metavar = extra.get("metavar") or ("N" if kind is int else dest.upper())
        kwargs.update(type=_lenient(kind) if kind in (int, float) else str, metavar=metavar)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Options from flags and a YAML file


def resolve_options(args: argparse.Namespace, *models: type[BaseModel]) -> list[Any]:
    """One validated instance per model, from `--config` (if given) overridden by the flags given.

    Raises:
        WEMoEError: an unreadable or malformed config file, a duplicate or unknown key in it, a bad value (from a
            flag or the file: the same message), or both the deprecated and the current name of one option.
    """
    from pydantic import ValidationError  # here, not at the top: building parsers must not import pydantic

    owner: dict[str, type[BaseModel]] = {}
    deprecated: dict[str, str] = {}
    for model in models:
        owner.update(dict.fromkeys(model.model_fields, model))
        deprecated.update(getattr(model, "DEPRECATED_NAMES", {}))
    config = getattr(args, "config", None)
    source = f"config file '{config}'"
    file_values: dict[str, Any] = {}
    if config:
        file_values = rename_deprecated(
            load_yaml_mapping(config),
            deprecated,
            describe=lambda old, new: f"'{old}' in {source} is deprecated; use '{new}'",
        )
        unknown = [key for key in file_values if key not in owner]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(owner), n=1, cutoff=0.6)
            suggestion = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(
                f"unknown option '{unknown[0]}' in {source}{suggestion}; valid options: {', '.join(owner)}"
            )
    given = {key: value for key, value in vars(args).items() if key in owner or key in deprecated}
    given = rename_deprecated(
        given,
        deprecated,
        describe=lambda old, new: f"--{old.replace('_', '-')} is deprecated; use {flag_of(owner[new], new)}",
    )
    instances = []
    for model in models:
        values = {key: value for key, value in file_values.items() if owner[key] is model}
        values.update({key: value for key, value in given.items() if owner.get(key) is model})
        try:
            instances.append(model.model_validate(values))
        except ValidationError as err:
            raise WEMoEError(describe_validation_error(err, model, source if config else None)) from None
    return instances


__all__ = [
    "HelpFormatter",
    "OptionParser",
    "UsageError",
    "add_config_option",
    "add_logging_options",
    "add_options",
    "normalize_flags",
    "resolve_options",
]
