"""Model cards: Jinja templates in `model_cards/` rendered with `huggingface_hub.ModelCard`.

`render_card` is generic (any template, any metadata, any context). `merge_card` builds the card of a merged
model folder from what the folder itself records (config.json provenance, merge_config.yaml, weight headers),
so the recipe is the documentation and the card can be re-rendered later, e.g. with a Hub repo id as
`model_id` and extra `sections` such as evaluation results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .errors import WEMoEError
from .merging.io import count_parameters, weight_files
from .merging.registry import get_method


def _template_dir() -> Path:
    """The installed `model_cards/` templates (the repository's top-level folder, packaged as
    `hf_wemoe.model_cards`)."""
    from importlib.resources import files

    try:
        return Path(str(files("hf_wemoe.model_cards")))
    except ModuleNotFoundError:  # an editable install runs from the source tree
        return Path(__file__).resolve().parents[2] / "model_cards"


TEMPLATE_DIR = _template_dir()
HUB_URL = "https://huggingface.co"
PROJECT_URL = "https://github.com/hf-wemoe/hf-wemoe"


def render_card(template: str | Path, metadata: dict[str, Any], **context: Any) -> ModelCard:
    """Render a card template with YAML metadata (`ModelCardData` fields) and template variables.

    Args:
        template: a file name in `model_cards/`, or a path to a template file. The template writes
            the metadata block with `{{ card_data }}` between `---` lines.
        metadata: card metadata (`base_model`, `tags`, `pipeline_tag`, `eval_results`, ...).
        **context: variables the template uses.

    Raises:
        WEMoEError: the template is missing or the rendered card's metadata does not parse back.
    """
    path = Path(template)
    if not path.is_file():
        path = TEMPLATE_DIR / str(template)
    if not path.is_file():
        raise WEMoEError(f"model card template '{template}' not found (looked in {TEMPLATE_DIR})")
    card = ModelCard.from_template(ModelCardData(**metadata), template_path=str(path), **context)
    return validate_card(str(card))


def validate_card(text: str) -> ModelCard:
    """Parse a card's text back into a `ModelCard`, raising `WEMoEError` when its metadata is invalid."""
    try:
        card = ModelCard(text)
    except Exception as err:  # noqa: BLE001 -- YAML and metadata errors of many kinds
        raise WEMoEError(f"invalid model card metadata: {' '.join(str(err).split())}") from err
    if not text.startswith("---"):
        raise WEMoEError("invalid model card: it has no metadata block")
    return card


def merge_card(
    folder: str | Path,
    model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **context: Any,
) -> ModelCard:
    """The model card of a merged model folder (written by `hf-wemoe merge`).

    Args:
        folder: the merged model folder (config.json with provenance, merge_config.yaml, weights).
        model_id: how users load the model (a Hub repo id or a path); defaults to the folder name.
        metadata: metadata to add or override (e.g. `eval_results`, `datasets`, `license`).
        **context: extra template variables; `sections=[(title, markdown), ...]` adds sections at the end.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    provenance = config.get("provenance") or {}
    recipe_path = folder / "merge_config.yaml"
    recipe = (
        yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else provenance.get("recipe", {})
    )
    method = get_method(recipe["method"])
    base = _source_entry("base", provenance.get("base"), recipe["base"])
    experts = [
        _source_entry(name, (provenance.get("experts") or {}).get(name), ref)
        for name, ref in recipe["experts"].items()
    ]
    hub_models = [entry["repo_id"] for entry in [base, *experts] if entry["repo_id"]]
    card_metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
        "base_model": list(dict.fromkeys(hub_models)) or None,
        "base_model_relation": "merge",
        "tags": ["hf-wemoe", "merge", "model-merging", "clip", "vision", *method.tags],
    }
    card_metadata.update(metadata or {})
    parameters = count_parameters(folder)
    weights_bytes = sum(path.stat().st_size for path in weight_files(folder))
    # Option values as written in the recipe's YAML (true/false, not Python's True/False).
    options = {
        key: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        for key, value in recipe.items()
        if key not in ("base", "experts", "method")
    }
    values = {
        "model_id": model_id or folder.name,
        "method": method.name,
        "method_summary": method.summary,
        "base": base,
        "experts": experts,
        "options": options,
        "recipe": recipe,
        "parameters": {key: f"{value:,}" for key, value in parameters.items()},
        "weights_size": f"{weights_bytes / 1e9:.2f} GB"
        if weights_bytes >= 1e8
        else f"{weights_bytes / 1e6:.1f} MB",
        "has_preprocessor": (folder / "preprocessor_config.json").is_file(),
        "recipe_yaml": recipe_path.read_text().strip() if recipe_path.is_file() else yaml.safe_dump(recipe),
        "config": config,
        "hf_wemoe_version": provenance.get("hf_wemoe_version", ""),
        "project_url": PROJECT_URL,
        "sections": [],
    }
    values.update(context)
    return render_card(method.card_template, card_metadata, **values)


def _source_entry(name: str, record: dict | None, ref: str) -> dict[str, Any]:
    """Template fields of one source: name, reference, Hub repo id and link (None for local folders), revision."""
    record = record or {}
    is_hub = record.get("source") == "hub" if record else not Path(ref).expanduser().exists()
    repo_id = record.get("repo_id") or (ref.partition("@")[0] if is_hub else None)
    revision = record.get("commit") or record.get("content_sha256")
    return {
        "name": name,
        "ref": record.get("ref", ref),
        "repo_id": repo_id if is_hub else None,
        "url": f"{HUB_URL}/{repo_id}" if is_hub and repo_id else None,
        "revision": revision,
        "short_revision": (revision or "")[:12],
    }


__all__ = ["TEMPLATE_DIR", "merge_card", "render_card", "validate_card"]
