"""Model cards: Jinja templates in `model_cards/` rendered with `huggingface_hub.ModelCard`.

`render_card` is generic (any template, any metadata, any context). `model_card` builds the card of a model folder
written by `hf-wemoe merge` or `hf-wemoe train` from what the folder itself records: config.json (architecture,
WEMoE options, provenance with the resolved commits of the base and every expert, adaptation), merge_config.yaml,
weight headers, and, after `train`, eval_results.json and routing.png. The recipe is the documentation, and the
card can be re-rendered at any time, e.g. by `hf-wemoe push` with the Hub repo id as `model_id`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import markdown_table
from hf_wemoe.io.layout import (
    CARD_NAME,
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    MERGE_CONFIG_NAME,
    PREPROCESSOR_NAME,
    ROUTING_PLOT_NAME,
    TOKENIZER_FILES,
)
from hf_wemoe.io.sources import parse_reference
from hf_wemoe.io.weights import count_parameters, weight_files
from hf_wemoe.merging.registry import get_method
from hf_wemoe.models.configuration_wemoe import DEFAULT_MOE_MODULES, DEPRECATED_FIELD_NAMES
from hf_wemoe.utils.formatting import format_size, one_line
from hf_wemoe.zeroshot.data import parse_dataset_ref


def _template_dir() -> Path:
    """The installed `model_cards/` templates (the repository's top-level folder, packaged as
    `hf_wemoe.hub.model_cards`)."""
    from importlib.resources import files

    try:
        return Path(str(files("hf_wemoe.hub.model_cards")))
    except ModuleNotFoundError:  # an editable install runs from the source tree
        return Path(__file__).resolve().parents[3] / "model_cards"


TEMPLATE_DIR = _template_dir()
HUB_URL = "https://huggingface.co"
PROJECT_URL = "https://github.com/hf-wemoe/hf-wemoe"

# model_type in config.json -> (is WEMoE, is a full CLIP model with a text tower).
MODEL_KINDS = {
    "wemoe_clip_vision_model": (True, False),
    "wemoe_clip": (True, True),
    "clip_vision_model": (False, False),
    "clip": (False, True),
}
# The reference of a source that a model built in Python did not record.
NOT_RECORDED = "not recorded"

# The Hub's zero-shot widget needs an example image and labels; this is the Hub documentation's own example.
DEFAULT_WIDGET = [
    {
        "src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png",
        "candidate_labels": "playing music, playing sports",
        "example_title": "Cat & Dog",
    }
]


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
    if not text.startswith("---"):
        raise WEMoEError("invalid model card: it has no metadata block")
    try:
        card = ModelCard(text)
    except Exception as err:  # noqa: BLE001 -- YAML and metadata errors of many kinds
        raise WEMoEError(f"invalid model card metadata: {one_line(err)}") from err
    return card


def model_card(
    folder: str | Path,
    model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **context: Any,
) -> ModelCard:
    """The model card of a model folder written by `hf-wemoe merge` or `hf-wemoe train`.

    Works for WEMoE / E-WEMoE vision towers, full CLIP models with a WEMoE vision tower (`--full-clip`) and static
    merges, with or without a recorded merge recipe (a model built in Python with `build_wemoe` has none).

    Args:
        folder: the model folder (config.json, weights; merge_config.yaml, eval_results.json and routing.png
            when present).
        model_id: how users load the model (a Hub repo id or a path); defaults to the folder name.
        metadata: metadata to add or override (e.g. `license`, `datasets`, `widget`).
        **context: extra template variables; `sections=[(title, markdown), ...]` adds sections at the end.

    Raises:
        WEMoEError: the folder has no readable config.json, or the card does not validate.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME, CONFIG_NAME)
    model_type = config.get("model_type")
    if model_type not in MODEL_KINDS:
        raise WEMoEError(
            f"cannot write a model card for '{folder}': its config.json has model_type {model_type!r}; expected "
            f"one of {', '.join(MODEL_KINDS)}"
        )
    is_wemoe, full_clip = MODEL_KINDS[model_type]
    vision_config = (config.get("vision_config") or {}) if full_clip else config
    provenance = vision_config.get("provenance") or config.get("provenance") or {}
    model_id = model_id or folder.name

    recipe, recipe_yaml = _recipe(folder, provenance, vision_config, is_wemoe)
    method = get_method(recipe["method"])
    base = _source_entry("base", provenance.get("base"), recipe["base"])
    experts = [
        _source_entry(name, (provenance.get("experts") or {}).get(name), ref)
        for name, ref in recipe["experts"].items()
    ]
    adaptation = _adaptation(provenance.get("adaptation"))
    calibration = provenance.get("calibration") or None
    results = _results(folder, adaptation)

    hub_models = [entry["repo_id"] for entry in [base, *experts] if entry["repo_id"]]
    datasets = [task["repo_id"] for task in (adaptation or {}).get("tasks", []) if task["repo_id"]]
    datasets += [task["repo_id"] for task in (results or {}).get("datasets", []) if task["repo_id"]]
    tags = ["hf-wemoe", "merge", "model-merging", "clip", "vision", *method.tags]
    if adaptation:
        tags.append("test-time-adaptation")
    card_metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-image-classification" if full_clip else "image-feature-extraction",
        "base_model": list(dict.fromkeys(hub_models)) or None,
        "base_model_relation": "merge",
        "tags": list(dict.fromkeys(tags)),
        "datasets": list(dict.fromkeys(datasets)) or None,
        **(provenance.get("base_license") or {}),
    }
    if results:
        card_metadata["metrics"] = ["accuracy"]
        card_metadata["eval_results"] = results["eval_results"]
        card_metadata["model_name"] = model_id
    if full_clip:
        card_metadata["widget"] = DEFAULT_WIDGET
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
        "model_id": model_id,
        "method": method.name,
        "method_summary": method.summary,
        "is_wemoe": is_wemoe,
        "full_clip": full_clip,
        "efficient": bool(recipe.get("shared_router")) or bool(recipe.get("sparsity")),
        "base": base,
        "experts": experts,
        "options": options,
        "recipe": recipe,
        "recipe_yaml": recipe_yaml,
        "wemoe": _wemoe_fields(vision_config) if is_wemoe else {},
        "parameters": {key: f"{value:,}" for key, value in parameters.items()},
        "weights_size": format_size(weights_bytes),
        "has_preprocessor": (folder / PREPROCESSOR_NAME).is_file(),
        "has_tokenizer": any((folder / name).is_file() for name in TOKENIZER_FILES),
        "processor_ref": model_id
        if (folder / PREPROCESSOR_NAME).is_file()
        else (base["repo_id"] or base["ref"]),
        "adaptation": adaptation,
        "calibration": calibration,
        "results": results,
        "routing_plot": ROUTING_PLOT_NAME if (folder / ROUTING_PLOT_NAME).is_file() else None,
        "config": config,
        "hf_wemoe_version": provenance.get("hf_wemoe_version", ""),
        "project_url": PROJECT_URL,
        "sections": [],
    }
    values.update(context)
    return render_card(method.card_template, card_metadata, **values)


def merge_card(
    folder: str | Path,
    model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    **context: Any,
) -> ModelCard:
    """The model card of a merged model folder (see `model_card`, which also covers adapted models)."""
    return model_card(folder, model_id=model_id, metadata=metadata, **context)


def write_card(folder: str | Path, model_id: str | None = None, **context: Any) -> Path:
    """Render `model_card(folder, model_id)` and save it as the folder's README.md; returns its path."""
    path = Path(folder) / CARD_NAME
    model_card(folder, model_id=model_id, **context).save(path)
    return path


def local_source_paths(folder: str | Path) -> list[str]:
    """The sources (base and experts) of a folder's merge recipe that are local paths, when none is a Hub repo.

    Such a card would publish those paths and name no `base_model`, so the Hub links the model to nothing; `hf-wemoe
    push` warns about it. Empty when a source is a Hub repo or the folder records no sources.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME, CONFIG_NAME)
    if config.get("model_type") not in MODEL_KINDS:
        return []
    is_wemoe, full_clip = MODEL_KINDS[config["model_type"]]
    vision_config = (config.get("vision_config") or {}) if full_clip else config
    provenance = vision_config.get("provenance") or config.get("provenance") or {}
    try:
        recipe, _ = _recipe(folder, provenance, vision_config, is_wemoe)
    except WEMoEError:
        return []
    refs = [str(ref) for ref in [recipe.get("base"), *(recipe.get("experts") or {}).values()] if ref]
    refs = [ref for ref in refs if ref != NOT_RECORDED]
    if any(_is_hub_ref(ref) for ref in refs):
        return []
    return list(dict.fromkeys(refs))


# ----------------------------------------------------------------------------------------------------------------
# What the card shows, read from the folder


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise WEMoEError(f"cannot read {what} in '{path.parent}': {err.strerror or err}") from err
    except ValueError as err:
        raise WEMoEError(f"{what} in '{path.parent}' is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise WEMoEError(f"{what} in '{path.parent}' must hold a JSON object")
    return data


def _recipe(
    folder: Path, provenance: dict[str, Any], vision_config: dict[str, Any], is_wemoe: bool
) -> tuple[dict[str, Any], str | None]:
    """The merge recipe (merge_config.yaml, else the one recorded in the config) and its YAML text.

    A WEMoE model built in Python records no recipe: one is reconstructed from its config (no YAML then).
    """
    path = folder / MERGE_CONFIG_NAME
    names = list(vision_config.get("expert_names") or [])
    if path.is_file():
        recipe = yaml.safe_load(path.read_text())
        return {**recipe, "experts": _in_routing_order(recipe["experts"], names)}, path.read_text().strip()
    if provenance.get("recipe"):
        recipe = provenance["recipe"]
        recipe = {**recipe, "experts": _in_routing_order(recipe.get("experts") or {}, names)}
        return recipe, yaml.safe_dump(recipe, sort_keys=False).strip()
    if not is_wemoe:
        raise WEMoEError(
            f"'{folder}' records no merge recipe (merge_config.yaml or provenance in config.json); only folders "
            "written by hf-wemoe merge or train get a generated card"
        )
    refs = vision_config.get("expert_refs") or [NOT_RECORDED] * len(names)
    sparsity = float(_field(vision_config, "sparsity") or 0.0)
    shared = bool(vision_config.get("shared_router"))
    recipe = {
        "base": vision_config.get("base_model_ref") or NOT_RECORDED,
        "experts": dict(zip(names, refs)),
        "method": "e-wemoe" if shared and sparsity > 0 else "wemoe",
        "scaling": _field(vision_config, "scaling", 0.3),
        "router_depth": vision_config.get("router_depth", 2),
        "sparsity": sparsity,
        "shared_router": shared,
        "routing": vision_config.get("routing", "sample"),
        "task_vector_dtype": vision_config.get("task_vector_dtype", "float32"),
    }
    return recipe, None


def _in_routing_order(experts: dict[str, str], names: list[str]) -> dict[str, str]:
    """The recipe's experts in the model's routing order (its `expert_names`).

    config.json stores mappings with sorted keys, so the recipe recorded there lists the experts alphabetically;
    the card's examples (`collapse([1, 0, ...])`) and a rebuild from its recipe need the routing order.
    """
    if sorted(experts) != sorted(names):
        return experts
    return {name: experts[name] for name in names}


def _field(config: dict[str, Any], name: str, default: Any = None) -> Any:
    """A WEMoE field of a config.json dict; configs saved before a field was renamed hold its old name."""
    if name in config:
        return config[name]
    old = next((old for old, new in DEPRECATED_FIELD_NAMES.items() if new == name), None)
    return config.get(old, default) if old else default


def _wemoe_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The WEMoE options as the card states them."""
    num_layers = int(config.get("num_hidden_layers") or 0)
    moe_layers = config.get("moe_layers")
    sparsity = float(_field(config, "sparsity") or 0.0)
    return {
        "scaling": _field(config, "scaling"),
        "router_depth": config.get("router_depth"),
        "shared_router": bool(config.get("shared_router")),
        "sparsity": sparsity,
        "kept_percent": f"{100 * (1 - sparsity):.3g}",
        "routing": config.get("routing", "sample"),
        "dtype": config.get("task_vector_dtype", "float32"),
        "moe_layers": "all" if moe_layers is None else ", ".join(str(i) for i in moe_layers),
        "num_layers": num_layers,
        "num_experts": len(config.get("expert_names") or []),
        "rank": config.get("rank"),
        "moe_modules": list(config.get("moe_modules") or DEFAULT_MOE_MODULES),
        "routes_mlp_only": set(config.get("moe_modules") or DEFAULT_MOE_MODULES) <= {"fc1", "fc2"},
        "low_rank": _low_rank(
            (config.get("provenance") or {}).get("low_rank"), list(config.get("expert_names") or [])
        ),
    }


def _low_rank(record: dict[str, Any] | None, names: list[str]) -> dict[str, Any] | None:
    """What the card says about low-rank task vectors, from `provenance["low_rank"]` of the config (written by
    `hf-wemoe merge --rank` and merges of LoRA experts): the stored rank, each expert's rank and kind, and the
    share of every task vector's energy ‖τ‖² the factors keep, averaged per layer, as percentages."""
    if not record:
        return None
    energy = record.get("kept_energy") or {}
    layers = sorted(energy, key=lambda layer: int(layer))
    experts = record.get("experts") or {}
    rows = [
        (layer, [_percent(energy[layer].get(name)) for name in names]) for layer in layers
    ]
    means = []
    for name in names:
        values = [energy[layer][name] for layer in layers if isinstance(energy[layer].get(name), (int, float))]
        means.append(_percent(sum(values) / len(values)) if values else "–")
    header = "| layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = [header, *(f"| {layer} | " + " | ".join(cells) + " |" for layer, cells in rows)]
    lines.append("| mean | " + " | ".join(means) + " |")
    entries = [{"name": name, **(experts.get(name) or {})} for name in names]
    full = [entry for entry in entries if entry.get("kind") != "lora"]
    return {
        "rank": record.get("rank"),
        "lora": [entry for entry in entries if entry.get("kind") == "lora"],
        "full": [entry["name"] for entry in full],
        "full_rank": full[0].get("rank") if full else None,
        "has_lora": len(full) < len(entries),
        "has_full": bool(full),
        "table": "\n".join(lines) if layers else None,
    }


def _percent(value: Any) -> str:
    """A kept-energy fraction as a percentage; 100% only when nothing is lost (LoRA experts)."""
    if not isinstance(value, (int, float)):
        return "–"
    if value >= 1.0:
        return "100%"
    return f"{min(100 * value, 99.99):.2f}%"


def _source_entry(name: str, record: dict | None, ref: str) -> dict[str, Any]:
    """Template fields of one source: name, reference, Hub repo id and link (None for local folders), revision."""
    record = record or {}
    is_hub = record.get("source") == "hub" if record else _is_hub_ref(ref)
    repo_id = record.get("repo_id") or (ref.partition("@")[0] if is_hub else None)
    revision = record.get("commit") or record.get("content_sha256")
    if revision is None and is_hub and "@" in ref:
        revision = ref.partition("@")[2]
    url = f"{HUB_URL}/{repo_id}" if is_hub and repo_id else None
    return {
        "name": name,
        "ref": record.get("ref", ref),
        "repo_id": repo_id if is_hub else None,
        "url": url,
        "revision": revision,
        "short_revision": (revision or "")[:12],
        # The files exactly as they were read: the repo at that commit.
        "revision_url": f"{url}/tree/{revision}" if url and revision else None,
    }


def _is_hub_ref(ref: str) -> bool:
    if str(ref) == NOT_RECORDED or Path(str(ref)).expanduser().exists():
        return False
    try:
        return not parse_reference(ref).is_local
    except WEMoEError:
        return False


def _dataset_entry(task: str, ref: str | None) -> dict[str, Any]:
    """A task's dataset for the card: Hub repo id and link, config and split, or a local path."""
    entry = {"task": task, "ref": ref, "repo_id": None, "url": None, "config": None, "split": None}
    if not ref:
        return entry
    try:
        parsed = parse_dataset_ref(ref)
    except WEMoEError:
        return entry
    entry["split"] = parsed.split
    if not parsed.is_local:
        entry.update(repo_id=parsed.repo, url=f"{HUB_URL}/datasets/{parsed.repo}", config=parsed.config)
    return entry


def _adaptation(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The router adaptation recorded by `hf-wemoe train`, as the card shows it."""
    if not record:
        return None
    options = record.get("options") or {}
    loss = record.get("final_loss")
    return {
        "steps": record.get("steps"),
        "tasks": [_dataset_entry(name, ref) for name, ref in (record.get("tasks") or {}).items()],
        # The label of what ran (e.g. "infomax + routing 1"); records before 0.2 only have the option.
        "objective": record.get("objective") or options.get("objective", "entropy"),
        "lr": options.get("lr"),
        "batch_size_per_task": options.get("batch_size_per_task"),
        "final_loss": f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
        "options": options,
    }


def _results(folder: Path, adaptation: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accuracy table and `model-index` entries from eval_results.json (written by train or eval)."""
    path = folder / EVAL_RESULTS_NAME
    if not path.is_file():
        return None
    payload = _read_json(path, EVAL_RESULTS_NAME)
    accuracy = payload.get("accuracy") or {}
    if not isinstance(accuracy, dict) or not accuracy:
        return None
    tasks = list(accuracy)
    refs = dict(payload.get("datasets") or {})
    for task in (adaptation or {}).get("tasks", []):
        refs.setdefault(task["task"], task["ref"])
    datasets = [_dataset_entry(task, refs.get(task)) for task in tasks]
    rows = [("this model", accuracy)]
    for baseline in payload.get("baselines") or []:
        rows.append((str(baseline.get("name", "baseline")), baseline.get("accuracy") or {}))
    eval_results = []
    for entry in datasets:
        value = accuracy[entry["task"]]
        if not isinstance(value, (int, float)):
            continue
        eval_results.append(
            EvalResult(
                task_type="zero-shot-image-classification",
                task_name="Zero-shot image classification",
                dataset_type=entry["repo_id"] or entry["task"],
                dataset_name=entry["task"],
                dataset_config=entry["config"],
                dataset_split=entry["split"] or "test",
                metric_type="accuracy",
                metric_name="Top-1 accuracy (%)",
                metric_value=round(float(value), 2),
            )
        )
    counts = payload.get("num_examples") or {}
    return {
        "tasks": tasks,
        "table": markdown_table(rows, tasks),
        "baselines": [name for name, _ in rows[1:]],
        "routing": payload.get("routing"),
        "num_examples": {task: counts.get(task) for task in tasks},
        "datasets": datasets,
        "eval_results": eval_results,
    }


__all__ = [
    "TEMPLATE_DIR",
    "local_source_paths",
    "merge_card",
    "model_card",
    "render_card",
    "validate_card",
    "write_card",
]
