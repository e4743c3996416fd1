"""Prompt templates for CLIP zero-shot classification heads.

A template is a string with one class-name placeholder, ``{c}`` (or ``{}``), e.g. ``"a photo of a {c}."``.
Built-in sets cover the eight tasks of the WEMoE benchmark (the templates of the task-arithmetic
literature) plus a ``generic`` set. Other modules add their own sets with :func:`register_templates`;
users pass their own with a text file (one template per line) or a JSON list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from hf_wemoe.errors import WEMoEError

__all__ = [
    "PLACEHOLDERS",
    "TEMPLATES_HELP",
    "fill_template",
    "get_templates",
    "known_template_sets",
    "load_classnames",
    "load_templates_file",
    "register_templates",
    "resolve_task_templates",
    "validate_templates",
]

#: Placeholders that stand for the class name inside a template.
PLACEHOLDERS = ("{c}", "{}")

TEMPLATES_HELP = (
    "Prompt templates: a built-in set name (sun397, stanford-cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd, "
    "generic) or a file with one template per line (or a JSON list of strings); '{c}' (or '{}') stands for the "
    "class name, e.g. 'a photo of a {c}.'. Blank lines and lines starting with '#' are ignored."
)

_GENERIC = [
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a photo of the {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of a {c}.",
    "a good photo of a {c}.",
    "a bright photo of a {c}.",
]

_BUILTIN: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "sun397": (
        ["a photo of a {c}.", "a photo of the {c}."],
        ("sun-397",),
    ),
    "stanford-cars": (
        [
            "a photo of a {c}.",
            "a photo of the {c}.",
            "a photo of my {c}.",
            "i love my {c}!",
            "a photo of my dirty {c}.",
            "a photo of my clean {c}.",
            "a photo of my new {c}.",
            "a photo of my old {c}.",
        ],
        ("cars", "stanfordcars"),
    ),
    "resisc45": (
        [
            "satellite imagery of {c}.",
            "aerial imagery of {c}.",
            "satellite photo of {c}.",
            "aerial photo of {c}.",
            "satellite view of {c}.",
            "aerial view of {c}.",
            "satellite imagery of a {c}.",
            "aerial imagery of a {c}.",
            "satellite photo of a {c}.",
            "aerial photo of a {c}.",
            "satellite view of a {c}.",
            "aerial view of a {c}.",
            "satellite imagery of the {c}.",
            "aerial imagery of the {c}.",
            "satellite photo of the {c}.",
            "aerial photo of the {c}.",
            "satellite view of the {c}.",
            "aerial view of the {c}.",
        ],
        ("resisc-45", "nwpu-resisc45"),
    ),
    "eurosat": (
        [
            "a centered satellite photo of {c}.",
            "a centered satellite photo of a {c}.",
            "a centered satellite photo of the {c}.",
        ],
        ("euro-sat",),
    ),
    "svhn": (['a photo of the number: "{c}".'], ()),
    "gtsrb": (
        [
            'a zoomed in photo of a "{c}" traffic sign.',
            'a centered photo of a "{c}" traffic sign.',
            'a close up photo of a "{c}" traffic sign.',
        ],
        (),
    ),
    "mnist": (['a photo of the number: "{c}".'], ()),
    "dtd": (
        [
            "a photo of a {c} texture.",
            "a photo of a {c} pattern.",
            "a photo of a {c} thing.",
            "a photo of a {c} object.",
            "a photo of the {c} texture.",
            "a photo of the {c} pattern.",
            "a photo of the {c} thing.",
            "a photo of the {c} object.",
        ],
        ("describable-textures",),
    ),
    "generic": (_GENERIC, ("default",)),
}

# name -> templates, and alias -> name; both keyed by the normalised spelling.
_SETS: dict[str, list[str]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    """Normalise a set name: case-insensitive, and ``_``/space/``-`` are the same character."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def validate_templates(templates: Iterable[str], where: str = "templates") -> list[str]:
    """Return ``templates`` as a list, or raise :class:`WEMoEError` (prefixed by ``where``) if one lacks a
    class-name placeholder or there are none."""
    out = []
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise WEMoEError(f"{where}: template {i + 1} is {type(template).__name__}, expected a string")
        if not any(p in template for p in PLACEHOLDERS):
            raise WEMoEError(
                f"{where}: template {i + 1} {template!r} has no class-name placeholder; write '{{c}}' where the "
                "class name goes, e.g. 'a photo of a {c}.'"
            )
        out.append(template)
    if not out:
        raise WEMoEError(f"{where}: no templates; give at least one, e.g. 'a photo of a {{c}}.'")
    return out


def register_templates(
    name: str, templates: Sequence[str], *, aliases: Iterable[str] = (), overwrite: bool = False
) -> None:
    """Add a named template set (and optional aliases) to the registry.

    Names are case-insensitive and ``_``, ``-`` and spaces are interchangeable. Registering the same templates
    again is a no-op; different templates under an existing name raise ``ValueError`` unless ``overwrite``.
    """
    key = _key(name)
    templates = validate_templates(templates, f"template set {name!r}")
    keys = [key, *(_key(a) for a in aliases)]
    for k in keys:
        current = _SETS.get(_ALIASES.get(k, k))
        if current is not None and current != templates and not overwrite:
            raise ValueError(f"template set {k!r} is already registered with other templates")
    _SETS[key] = list(templates)
    for k in keys:
        _ALIASES[k] = key


def known_template_sets() -> list[str]:
    """The registered set names (without aliases), sorted."""
    return sorted(_SETS)


def _unknown_message(problem: str) -> str:
    return (
        f"{problem} (known sets: {', '.join(known_template_sets())}); --templates generic works for any task "
        "(photo prompts such as 'a photo of a {c}.'), or pass --templates FILE (one template per line, '{c}' for "
        "the class name) and, when the dataset has no ClassLabel column, --classnames FILE (one class name per "
        "line)"
    )


def _looks_like_path(text: str) -> bool:
    return any(sep in text for sep in ("/", "\\")) or text.startswith(("~", ".")) or Path(text).suffix != ""


def load_templates_file(path: str | Path) -> list[str]:
    """Read templates from a text file (one per line, ``#`` comments) or a JSON list of strings."""
    path = Path(path).expanduser()
    text = _read_text(path, "templates")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        items = _json_list(text, path, "templates")
    else:
        items = [line.strip() for line in text.splitlines()]
        items = [line for line in items if line and not line.startswith("#")]
    return validate_templates(items, str(path))


def get_templates(name_or_path: str | Path) -> list[str]:
    """Return a template set by registered name (case-insensitive, aliases accepted) or from a file.

    Raises :class:`WEMoEError` when the name is unknown and no such file exists.
    """
    if isinstance(name_or_path, str):
        name = _ALIASES.get(_key(name_or_path))
        if name is not None:
            return list(_SETS[name])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_templates_file(path)
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        raise WEMoEError(f"templates file not found: {name_or_path}; give an existing file or a set name")
    raise WEMoEError(_unknown_message(f"unknown template set {name_or_path!r}"))


def resolve_task_templates(
    task: str, templates: str | Path | Sequence[str] | None = None, dataset_name: str | None = None
) -> list[str]:
    """Templates for one task: explicit ``templates`` (a set name, a file or a list) if given, else the set
    named like the task, else the set named like the dataset (last part of a Hub id, e.g. ``stanford_cars``)."""
    if templates is not None:
        if isinstance(templates, (str, Path)):
            return get_templates(templates)
        return validate_templates(templates, f"templates of task {task!r}")
    for candidate in (task, dataset_name.rstrip("/").rsplit("/", 1)[-1] if dataset_name else None):
        if candidate and _key(candidate) in _ALIASES:
            return get_templates(candidate)
    raise WEMoEError(_unknown_message(f"no built-in prompt templates for task {task!r}"))


def fill_template(template: str, classname: str) -> str:
    """Put the class name into a template (plain substitution, other braces are left alone)."""
    for placeholder in PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, classname)
    raise WEMoEError(f"template {template!r} has no class-name placeholder '{{c}}'")


def load_classnames(path: str | Path) -> list[str]:
    """Read class names, in label order, from a text file (one per line) or a JSON list of strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WEMoEError(f"class-names file not found: {path}; give a file with one class name per line")
    text = _read_text(path, "class names")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        names = [str(n).strip() for n in _json_list(text, path, "class names")]
    else:
        names = [line.strip() for line in text.splitlines()]
        names = [line for line in names if line]
    if not names:
        raise WEMoEError(f"{path}: no class names; write one class name per line, in label order")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise WEMoEError(f"{path}: duplicate class names {duplicates}; each label needs its own name")
    return names


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WEMoEError(f"cannot read {what} file {path}: {exc}") from exc


def _json_list(text: str, path: Path, what: str) -> list:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WEMoEError(f"{path}: invalid JSON ({exc}); expected a list of {what}") from exc
    if not isinstance(items, list):
        raise WEMoEError(f"{path}: expected a JSON list of {what}, found {type(items).__name__}")
    return items


for _name, (_templates, _aliases) in _BUILTIN.items():
    register_templates(_name, _templates, aliases=_aliases)
del _name, _templates, _aliases
