"""PEFT LoRA adapters as experts: a local folder or Hub repo with `adapter_config.json` and adapter weights.

`open_expert` opens an expert reference: a PEFT LoRA adapter when the folder or repo holds `adapter_config.json`,
otherwise a full checkpoint (`hf_wemoe.io.sources.open_source`). An adapter is read against the base it was
trained on, as an [`AdapterSource`]: the same tensor names, shapes and `get(key)` as a full checkpoint (base weight
plus the LoRA delta, for methods that work on whole tensors), and for every adapted weight its exact low-rank task
vector `delta = scaling · B @ A` as factors (`factors(key)`, no SVD) or densely (`delta(key)`).

What is read, with PEFT's meaning (PEFT 0.21, `peft.tuners.lora`):

- `r`, `lora_alpha`, `use_rslora`: scaling = alpha / r, or alpha / sqrt(r) with rsLoRA; `rank_pattern` and
  `alpha_pattern` give other ranks and alphas to the modules whose name ends with one of their keys (regular
  expressions, first match wins), as PEFT resolves them when it builds the layers.
- `target_modules` (a list of names, matched as the whole module name or its last dot-separated parts, or one
  regular expression matched against the whole name), `exclude_modules`, `layers_to_transform` and
  `layers_pattern` select the adapted modules; the weights must hold LoRA factors for exactly those modules of the
  vision tower, or the adapter is refused as inconsistent.
- `fan_in_fan_out` is for `Conv1D` layers (GPT-2 style, weights stored transposed); every module LoRA may adapt in a
  CLIP vision tower is an `nn.Linear`, for which PEFT switches the flag off and uses the factors as they are: so
  does this reader.
- The adapter may have been saved on a `CLIPVisionModel` (transformers 4: keys `vision_model.encoder...`;
  transformers 5: `encoder...`), on its `vision_model` (`encoder...`), or on a full `CLIPModel`. Of a full CLIP
  adapter only the vision tower is used, like the vision tower of a full CLIP checkpoint: LoRA factors of the text
  tower are ignored (with a warning), because the merged model's zero-shot heads come from the base's text tower.

Refused, with one line each: other PEFT methods (`peft_type` other than LORA), DoRA, LoRA on biases or extra
trained modules (`bias`, `lora_bias`, `modules_to_save`, `target_parameters`, ...), initialisations that change the
base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ: the factors only hold on the changed base), adapted modules other
than the vision encoder's q_proj, k_proj, v_proj, out_proj, fc1 and fc2, modules the base lacks, factors whose shapes
do not fit the base, folders without weights, and pickle-only adapters (`adapter_model.bin`) unless pickle is allowed.

The base: `base_model_name_or_path` of `adapter_config.json` must name the same model as `--base` where that can be
told, i.e. the same Hub repo id (case-insensitive, any revision; a local folder in the Hub cache counts as its repo),
or the same local folder. Where it cannot be told (no name recorded, or a folder on another machine, or a Hub id
against a local folder outside the cache), only the shapes are checked.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_wemoe.errors import SourceError
from hf_wemoe.io.layout import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_SAFETENSORS_NAME
from hf_wemoe.io.sources import (
    ModelReference,
    ModelSource,
    PickleFile,
    SafetensorsFile,
    content_hash,
    hub_listing,
    hub_snapshot,
    open_source,
    parse_reference,
    pickle_refusal,
)
from hf_wemoe.io.weights import check_finite
from hf_wemoe.models.configuration_wemoe import ATTENTION_MODULES, MOE_MODULES
from hf_wemoe.utils.formatting import one_line

logger = logging.getLogger(__name__)

# The modules of a CLIP vision encoder layer that a LoRA expert may adapt: the ones a WEMoE model can route.
LORA_MODULES = MOE_MODULES
_SUPPORTED_PATH = re.compile(
    r"^encoder\.layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
)
_SUPPORTED_TEXT = "the vision encoder's q_proj, k_proj, v_proj, out_proj, fc1 and fc2"
# PEFT saves the adapted model's state under this prefix, and the factors of a module as `<module>.lora_A.weight`.
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_VISION_PREFIX = "vision_model."
_TEXT_PREFIXES = ("text_model.", "text_projection.")
# How the advice to work around a refused adapter reads.
_MERGE_FIRST = (
    "merge it into its base with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
    "save_pretrained) and pass that folder as the expert"
)
# adapter_config.json options that make the adapter more than LoRA factors on nn.Linear weights: value -> what it
# is. An option counts as set when it is neither null, false, empty nor its "off" value below.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (a learned magnitude per output row, not a low-rank delta)",
    "lora_bias": "LoRA on the biases (lora_bias)",
    "bias": "trained biases (bias='{value}')",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "target_parameters": "LoRA on parameters instead of modules (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron layers (megatron_config)",
}
_OFF_VALUES = {"bias": "none"}
# Initialisations after which the factors only hold on a base whose weights PEFT changed (unless converted back).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_HF_CACHE_REPO = re.compile(r"^models--([^/]+?)--(.+)$")


def module_weight_key(layer: int, module: str) -> str:
    """The `CLIPVisionModel` weight key of `module` (one of `LORA_MODULES`) in encoder layer `layer`."""
    parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"encoder.layers.{layer}.{parent}.{module}.weight"


def is_adapter_folder(folder: str | Path) -> bool:
    """True when a local folder holds a PEFT adapter (`adapter_config.json`)."""
    return (Path(folder) / ADAPTER_CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------------
# The source


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear layer: where its factors are stored and how they scale."""

    key: str
    """The adapted weight's key in the normalised `CLIPVisionModel` layout (`encoder.layers.0.mlp.fc1.weight`)."""
    layer: int
    module: str
    """`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1` or `fc2`."""
    rank: int
    scaling: float
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    a_name: str
    b_name: str


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter opened against its base: reads like a full checkpoint, plus exact low-rank factors.

    `keys`, `shape`, `dtype` and `config` are the base's; `get(key)` is the base tensor plus the LoRA delta (the
    adapter merged into the base, as PEFT's `merge_and_unload` computes it); `factors(key)` and `delta(key)` give
    the task vector of an adapted weight (None for the others, whose task vector is zero).
    """

    reference: ModelReference
    folder: Path
    base: ModelSource
    commit: str | None
    """Resolved Hub commit sha, or `sha256:<hex>` of the adapter files read from a local folder."""
    settings: dict[str, Any]
    """The `adapter_config.json` values that matter: r, lora_alpha, use_rslora, target_modules, ..."""
    modules: dict[str, LoraModule]
    """Adapted weight key -> its LoRA module, in the base's key order."""
    base_check: str
    """How the base was matched: `"hub repo"`, `"folder"` or `"shapes"` (the name could not be compared)."""
    weight_files: list[Path] = field(default_factory=list)
    ignored_text_modules: int = 0
    """LoRA modules of a full CLIP adapter's text tower, not used."""
    _file: SafetensorsFile | PickleFile | None = field(default=None, repr=False)

    layout: ClassVar[str] = "peft_lora"

    @property
    def config(self) -> CLIPVisionConfig:
        """The base's CLIP vision config (the adapter has the base's architecture)."""
        return self.base.config

    @property
    def keys(self) -> list[str]:
        """The base's tensor names (normalised layout)."""
        return self.base.keys

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` (the base's)."""
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of tensor `key` (the base's)."""
        return self.base.dtype(key)

    def total_numel(self) -> int:
        """Number of elements of the vision tower (the base's)."""
        return self.base.total_numel()

    @property
    def preprocessor_config(self) -> None:
        """Adapters carry no image processor (the base's is used)."""
        return None

    @property
    def is_hub(self) -> bool:
        """True when the adapter was downloaded from the Hub."""
        return not self.reference.is_local

    @property
    def ranks(self) -> list[int]:
        """The distinct ranks of the adapted modules, ascending."""
        return sorted({module.rank for module in self.modules.values()})

    @property
    def rank(self) -> int:
        """The largest rank of the adapted modules."""
        return max(self.ranks)

    @property
    def targets(self) -> list[str]:
        """The kinds of module adapted (`q_proj`, ...), in `LORA_MODULES` order."""
        kinds = {module.module for module in self.modules.values()}
        return [name for name in LORA_MODULES if name in kinds]

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact task vector of weight `key` as float32 factors `(A (r, in), B (out, r))` with
        `B @ A = scaling · B_lora @ A_lora` (the scaling is folded into B), or None when `key` is not adapted.

        Raises:
            SourceError: a factor with NaN or infinite values.
        """
        module = self.modules.get(key)
        if module is None:
            return None
        down = self._read(module.a_name).float()
        up = self._read(module.b_name).float()
        return down, up * module.scaling

    def delta(self, key: str) -> torch.Tensor | None:
        """The dense task vector `scaling · B @ A` of weight `key` (float32), or None when `key` is not adapted."""
        pair = self.factors(key)
        return None if pair is None else pair[1] @ pair[0]

    def get(self, key: str) -> torch.Tensor:
        """Tensor `key` of the base with the adapter merged in (the base's dtype)."""
        tensor = self.base.get(key)
        delta = self.delta(key)
        if delta is None:
            return tensor
        return (tensor.float() + delta).to(tensor.dtype)

    def provenance(self) -> dict[str, Any]:
        """What was read: the reference, where it came from, the resolved revision, and the LoRA settings."""
        record: dict[str, Any] = {
            "ref": self.reference.recorded,
            "source": "local" if self.reference.is_local else "hub",
        }
        if self.reference.is_local:
            record["content_sha256"] = self.commit.removeprefix("sha256:") if self.commit else None
        else:
            record.update(
                repo_id=self.reference.repo_id, revision=self.reference.revision, commit=self.commit
            )
        record["layout"] = self.layout
        record["lora"] = {
            "rank": self.rank,
            "ranks": self.ranks,
            "lora_alpha": self.settings["lora_alpha"],
            "use_rslora": self.settings["use_rslora"],
            "targets": self.targets,
            "modules": len(self.modules),
            "base_model_name_or_path": self.settings.get("base_model_name_or_path"),
            "base_check": self.base_check,
        }
        return record

    def _read(self, name: str) -> torch.Tensor:
        assert self._file is not None
        tensor = self._file.get(name)
        check_finite(tensor, f"LoRA factor '{name}' of '{self.reference.text}'")
        return tensor


# ----------------------------------------------------------------------------------------------------------------
# Opening


def open_expert(
    reference: str | ModelReference, base: ModelSource, *, allow_pickle: bool = False
) -> ModelSource | AdapterSource:
    """Open an expert: a PEFT LoRA adapter (a folder or Hub repo with `adapter_config.json`) against `base`, or
    else a full checkpoint (`open_source`).

    Raises:
        SourceError: what `open_source` or `open_adapter` refuse.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(reference)
    if ref.is_local:
        if is_adapter_folder(ref.path):
            return open_adapter(ref, base, allow_pickle=allow_pickle)
        return open_source(ref, allow_pickle=allow_pickle)
    commit, names = hub_listing(ref)
    if ADAPTER_CONFIG_NAME in names:
        return _open_hub_adapter(ref, base, allow_pickle, commit, names)
    return open_source(ref, allow_pickle=allow_pickle)


def open_adapter(
    reference: str | ModelReference, base: ModelSource, *, allow_pickle: bool = False, hash_local: bool = True
) -> AdapterSource:
    """Open a PEFT LoRA adapter (local folder or Hub repo) trained on `base`.

    Args:
        reference: the adapter's folder or Hub repo id (`org/name[@revision]`).
        base: the opened base model; the adapter's factors are checked against its shapes.
        allow_pickle: accept an adapter whose only weights are `adapter_model.bin` (loaded with
            `torch.load(weights_only=True)`).
        hash_local: record a sha256 of the adapter files of a local folder as its revision.

    Raises:
        SourceError: not a LoRA adapter, an option hf-wemoe cannot honour, another base, no or pickle-only weights,
            adapted modules outside the vision encoder's linear layers or missing from the base, inconsistent
            targets, factors that do not fit the base.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(reference)
    if not ref.is_local:
        commit, names = hub_listing(ref)
        if ADAPTER_CONFIG_NAME not in names:
            raise SourceError(f"'{ref.text}' has no {ADAPTER_CONFIG_NAME}; it is not a PEFT adapter repo")
        return _open_hub_adapter(ref, base, allow_pickle, commit, names)
    folder = ref.path
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise SourceError(f"'{ref.text}' has no {ADAPTER_CONFIG_NAME}; it is not a PEFT adapter folder")
    settings = read_lora_settings(config_path, ref.text)
    base_check = check_adapter_base(settings.get("base_model_name_or_path"), base, ref.text)
    names = {path.name for path in folder.iterdir() if path.is_file()}
    weights = folder / _adapter_weights(names, ref, allow_pickle)
    commit = content_hash([config_path, weights]) if hash_local else None
    return _build(ref, folder, base, settings, base_check, weights, commit)


def _open_hub_adapter(
    ref: ModelReference, base: ModelSource, allow_pickle: bool, commit: str, names: set[str]
) -> AdapterSource:
    # The config first: a refused adapter (another base, DoRA, ...) costs no weight download.
    folder = hub_snapshot(ref, commit, [ADAPTER_CONFIG_NAME])
    settings = read_lora_settings(folder / ADAPTER_CONFIG_NAME, ref.text)
    base_check = check_adapter_base(settings.get("base_model_name_or_path"), base, ref.text)
    weights_name = _adapter_weights(names, ref, allow_pickle)
    folder = hub_snapshot(ref, commit, [ADAPTER_CONFIG_NAME, weights_name])
    return _build(ref, folder, base, settings, base_check, folder / weights_name, commit)


def _adapter_weights(names: set[str], ref: ModelReference, allow_pickle: bool) -> str:
    """The adapter weight file to read among the file names of an adapter folder or repo."""
    if ADAPTER_SAFETENSORS_NAME in names:
        return ADAPTER_SAFETENSORS_NAME
    if ADAPTER_PICKLE_NAME in names:
        if not allow_pickle:
            raise pickle_refusal(ref, ADAPTER_PICKLE_NAME)
        return ADAPTER_PICKLE_NAME
    raise SourceError(
        f"'{ref.text}' has {ADAPTER_CONFIG_NAME} but no adapter weights ({ADAPTER_SAFETENSORS_NAME}); point to a "
        "folder or repo saved by PEFT's save_pretrained"
    )


# ----------------------------------------------------------------------------------------------------------------
# adapter_config.json


def read_lora_settings(path: Path, what: str) -> dict[str, Any]:
    """The LoRA settings of an `adapter_config.json`, checked: r, lora_alpha, use_rslora, rank_pattern,
    alpha_pattern, target_modules, exclude_modules, layers_to_transform, layers_pattern, base_model_name_or_path.

    Raises:
        SourceError: unreadable JSON, not a LoRA adapter, an option that makes it more than LoRA factors (DoRA,
            trained biases, ...), or a value of the wrong type.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read {ADAPTER_CONFIG_NAME} of '{what}': {one_line(err)}") from err
    if not isinstance(data, dict):
        raise SourceError(f"{ADAPTER_CONFIG_NAME} of '{what}' must hold a JSON object")
    peft_type = data.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise SourceError(
            f"'{what}' is a PEFT {peft_type} adapter; hf-wemoe reads LoRA adapters (peft_type LORA) only: "
            f"{_MERGE_FIRST}"
        )
    for option, description in _UNSUPPORTED_OPTIONS.items():
        value = data.get(option)
        if value not in (None, False, "", [], {}, _OFF_VALUES.get(option)):
            raise SourceError(
                f"'{what}' uses {description.format(value=value)}, which is not a low-rank task vector that "
                f"hf-wemoe can route; {_MERGE_FIRST}"
            )
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise SourceError(
            f"'{what}' was initialised with init_lora_weights='{init}', which changes the base weights: its "
            "factors only hold on that changed base. Convert it with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) or merge it into a full model first"
        )
    settings = {
        "r": _positive_int(data.get("r", 8), "r", what),
        "lora_alpha": _number(data.get("lora_alpha", 8), "lora_alpha", what),
        "use_rslora": bool(data.get("use_rslora", False)),
        "rank_pattern": _pattern(data.get("rank_pattern"), "rank_pattern", what, integer=True),
        "alpha_pattern": _pattern(data.get("alpha_pattern"), "alpha_pattern", what, integer=False),
        "target_modules": _names_or_regex(data.get("target_modules"), "target_modules", what),
        "exclude_modules": _names_or_regex(
            data.get("exclude_modules"), "exclude_modules", what, optional=True
        ),
        "layers_to_transform": _layers(data.get("layers_to_transform"), what),
        "layers_pattern": _names_or_regex(data.get("layers_pattern"), "layers_pattern", what, optional=True),
        "fan_in_fan_out": bool(data.get("fan_in_fan_out", False)),
        "base_model_name_or_path": data.get("base_model_name_or_path") or None,
    }
    if settings["target_modules"] is None:
        raise SourceError(
            f"{ADAPTER_CONFIG_NAME} of '{what}' names no target_modules; PEFT writes them on save_pretrained: "
            "is the file complete?"
        )
    return settings


def _positive_int(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SourceError(
            f"{ADAPTER_CONFIG_NAME} of '{what}' has {name}={value!r}; expected a positive integer"
        )
    return value


def _number(value: Any, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SourceError(f"{ADAPTER_CONFIG_NAME} of '{what}' has {name}={value!r}; expected a finite number")
    return float(value)


def _pattern(value: Any, name: str, what: str, integer: bool) -> dict[str, float]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise SourceError(f"{ADAPTER_CONFIG_NAME} of '{what}' has {name}={value!r}; expected a mapping")
    check = _positive_int if integer else _number
    return {str(key): check(item, f"{name}[{key!r}]", what) for key, item in value.items()}


def _names_or_regex(value: Any, name: str, what: str, optional: bool = False) -> list[str] | str | None:
    if value is None or (optional and value in ("", [])):
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise SourceError(
                f"{ADAPTER_CONFIG_NAME} of '{what}' has {name}={value!r}, not a valid regular expression: {err}"
            ) from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise SourceError(
        f"{ADAPTER_CONFIG_NAME} of '{what}' has {name}={value!r}; expected a list of names or a regex"
    )


def _layers(value: Any, what: str) -> list[int] | int | None:
    if value is None or value == []:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return value
    raise SourceError(
        f"{ADAPTER_CONFIG_NAME} of '{what}' has layers_to_transform={value!r}; expected a layer index or a list"
    )


# ----------------------------------------------------------------------------------------------------------------
# PEFT's module selection (peft.tuners.tuners_utils.check_target_module_exists, re-stated)


def targets_module(settings: dict[str, Any], name: str) -> bool:
    """Whether an adapter with these settings adapts the module called `name` (its name in the model PEFT
    wrapped, e.g. `vision_model.encoder.layers.0.self_attn.q_proj`), as PEFT decides it."""
    exclude = settings.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{item}") for item in exclude)):
        return False
    target = settings["target_modules"]
    if isinstance(target, str):
        # A regular expression is matched against the whole name; PEFT ignores the layer options then.
        return re.fullmatch(target, name) is not None
    if name in target:
        return True  # a module named in full is adapted whatever the layer options say (as in PEFT)
    if not any(name.endswith(f".{item}") for item in target):
        return False
    layers = settings.get("layers_to_transform")
    if layers is None:
        return True
    index = _layer_index(name, settings.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    """The layer index in a module name: the number after the first `<segment>.` (or after one of `patterns`)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches the end of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _vision_module_names(config: CLIPVisionConfig) -> list[str]:
    """The module names of a `CLIPVisionModel` with this config (built on the meta device)."""
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    return [name for name, _ in model.named_modules() if name]


# ----------------------------------------------------------------------------------------------------------------
# The base


def check_adapter_base(recorded: str | None, base: ModelSource, what: str) -> str:
    """Compare an adapter's `base_model_name_or_path` with the opened base: `"hub repo"` or `"folder"` when they
    name the same model, `"shapes"` when that cannot be told (then only the factor shapes are checked).

    Raises:
        SourceError: they name different models (the message names both).
    """
    if not recorded:
        return "shapes"
    recorded = str(recorded)
    adapter_folder: Path | None = None
    adapter_repo: str | None = None
    path = Path(recorded).expanduser()
    if path.is_dir():
        adapter_folder = path.resolve()
        adapter_repo = _cached_repo_id(adapter_folder)
    elif not path.is_absolute() and not recorded.startswith((".", "~")):
        try:
            parsed = parse_reference(recorded)
        except SourceError:
            parsed = None
        if parsed is not None and not parsed.is_local:
            adapter_repo = parsed.repo_id
    if base.reference.is_local:
        base_folder = base.reference.path
        base_repo = _cached_repo_id(base_folder) if base_folder is not None else None
    else:
        base_folder, base_repo = None, base.reference.repo_id
    if adapter_repo and base_repo:
        if adapter_repo.lower() == base_repo.lower():
            return "hub repo"
    elif adapter_folder is not None and base_folder is not None:
        if adapter_folder == base_folder.resolve():
            return "folder"
    else:
        return "shapes"
    raise SourceError(
        f"adapter '{what}' was trained on '{recorded}' (base_model_name_or_path in its {ADAPTER_CONFIG_NAME}), "
        f"but --base is '{base.reference.text}'; pass --base {recorded}, or adapters trained on "
        f"'{base.reference.text}'"
    )


def _cached_repo_id(folder: Path) -> str | None:
    """The Hub repo id of a snapshot folder in the Hugging Face cache (`models--org--name/snapshots/<sha>`)."""
    if folder.parent.name != "snapshots":
        return None
    match = _HF_CACHE_REPO.match(folder.parent.parent.name)
    return f"{match.group(1)}/{match.group(2)}" if match else None


# ----------------------------------------------------------------------------------------------------------------
# The factors


def _build(
    ref: ModelReference,
    folder: Path,
    base: ModelSource,
    settings: dict[str, Any],
    base_check: str,
    weights: Path,
    commit: str | None,
) -> AdapterSource:
    """Index the factors of an adapter and check them against its settings and its base."""
    handle = PickleFile(weights) if weights.name == ADAPTER_PICKLE_NAME else SafetensorsFile(weights)
    factors: dict[str, dict[str, str]] = {}
    ignored = 0
    for stored in handle.shapes:
        if not stored.startswith(_PEFT_PREFIX):
            raise SourceError(
                f"'{ref.text}' holds tensor '{stored}', which is not a PEFT adapter weight ('{_PEFT_PREFIX}...'); "
                "point to a folder saved by PEFT's save_pretrained"
            )
        name = stored[len(_PEFT_PREFIX) :]
        if name.startswith(_TEXT_PREFIXES):
            ignored += 1
            continue
        match = _LORA_KEY.match(name)
        if match is None:
            raise SourceError(
                f"'{ref.text}' holds '{name}', which is not a LoRA factor (lora_A.weight or lora_B.weight); "
                f"hf-wemoe reads plain LoRA adapters only: {_MERGE_FIRST}"
            )
        factors.setdefault(match.group("module"), {})[match.group("part")] = stored
    if not factors:
        what = "LoRA factors of the text tower only" if ignored else "no LoRA factors"
        raise SourceError(
            f"'{ref.text}' holds {what}; a LoRA expert must adapt {_SUPPORTED_TEXT} of the vision tower"
        )
    prefixes = {name.startswith(_VISION_PREFIX) for name in factors}
    if len(prefixes) > 1:
        raise SourceError(
            f"'{ref.text}' mixes module names with and without the '{_VISION_PREFIX}' prefix; it was not saved by PEFT"
        )
    prefix = _VISION_PREFIX if prefixes.pop() else ""
    known = set(_vision_module_names(base.config))
    num_layers = base.config.num_hidden_layers
    modules: dict[str, LoraModule] = {}
    for full_name, parts in factors.items():
        path = full_name[len(prefix) :]
        supported = _SUPPORTED_PATH.match(path)
        if supported is None or path not in known:
            if supported is not None or (path not in known and path != "visual_projection"):
                raise SourceError(
                    f"'{ref.text}' adapts '{path}', which the base '{base.reference.text}' does not have (it has "
                    f"{num_layers} encoder layers of the CLIP vision tower); the adapter was made for another model"
                )
            raise SourceError(
                f"'{ref.text}' adapts '{path}'; hf-wemoe routes LoRA on {_SUPPORTED_TEXT} only: {_MERGE_FIRST}"
            )
        missing = "A" if "A" not in parts else "B" if "B" not in parts else None
        if missing:
            raise SourceError(
                f"'{ref.text}' has no lora_{missing} factor for '{path}' (only lora_{'B' if missing == 'A' else 'A'}); "
                "the adapter file is incomplete"
            )
        key = f"{path}.weight"
        module = supported.group(2)
        rank = int(_pattern_value(settings["rank_pattern"], full_name, settings["r"]))
        alpha = _pattern_value(settings["alpha_pattern"], full_name, settings["lora_alpha"])
        _check_shapes(ref, handle, parts, key, base, rank)
        scaling = alpha / math.sqrt(rank) if settings["use_rslora"] else alpha / rank
        modules[key] = LoraModule(key, int(supported.group(1)), module, rank, scaling, parts["A"], parts["B"])
    _check_targets(ref, settings, prefix, known, factors)
    if ignored:
        logger.warning(
            "'%s' also adapts the text tower (%d LoRA tensors); only its vision tower is used, as for full CLIP "
            "checkpoints",
            ref.text,
            ignored,
        )
    ordered = {key: modules[key] for key in base.keys if key in modules}
    return AdapterSource(
        reference=ref,
        folder=folder,
        base=base,
        commit=commit,
        settings=settings,
        modules=ordered,
        base_check=base_check,
        weight_files=[weights],
        ignored_text_modules=ignored // 2,
        _file=handle,
    )


def _check_shapes(
    ref: ModelReference,
    handle: SafetensorsFile | PickleFile,
    parts: dict[str, str],
    key: str,
    base: ModelSource,
    rank: int,
) -> None:
    """The factors of `key` must be (r, in) and (out, r) for the base weight (out, in) and the configured rank."""
    down, up = handle.shapes[parts["A"]], handle.shapes[parts["B"]]
    for name in (parts["A"], parts["B"]):
        if not handle.dtypes[name].is_floating_point:
            raise SourceError(
                f"'{ref.text}' stores LoRA factor '{name}' as {handle.dtypes[name]}; LoRA factors are floating-point "
                "tensors: the file is damaged"
            )
    out_features, in_features = base.shape(key)
    module = key.removesuffix(".weight")
    if len(down) != 2 or len(up) != 2 or down[1] != in_features or up[0] != out_features or down[0] != up[1]:
        raise SourceError(
            f"'{ref.text}' has LoRA factors of shapes A {tuple(down)}, B {tuple(up)} for '{module}', whose weight in "
            f"the base '{base.reference.text}' is {out_features}x{in_features}; the adapter was trained on another "
            "architecture"
        )
    if down[0] != rank:
        raise SourceError(
            f"'{ref.text}' has rank-{down[0]} factors for '{module}', but its {ADAPTER_CONFIG_NAME} says r={rank} "
            "(r / rank_pattern); the config and the weights disagree"
        )


def _check_targets(
    ref: ModelReference,
    settings: dict[str, Any],
    prefix: str,
    known: set[str],
    factors: dict[str, dict[str, str]],
) -> None:
    """The factors must cover exactly the vision modules that the adapter's target options select, as in PEFT."""
    selected = [prefix + name for name in sorted(known) if targets_module(settings, prefix + name)]
    unsupported = [name for name in selected if not _SUPPORTED_PATH.match(name[len(prefix) :])]
    if unsupported:
        raise SourceError(
            f"'{ref.text}' targets '{unsupported[0][len(prefix) :]}' (target_modules {settings['target_modules']!r}); "
            f"hf-wemoe routes LoRA on {_SUPPORTED_TEXT} only: {_MERGE_FIRST}"
        )
    extra = sorted(set(factors) - set(selected))
    if extra:
        raise SourceError(
            f"'{ref.text}' has LoRA factors for '{extra[0][len(prefix) :]}', which its target options "
            f"(target_modules {settings['target_modules']!r}, layers_to_transform "
            f"{settings['layers_to_transform']!r}) do not select; {ADAPTER_CONFIG_NAME} and the weights disagree"
        )
    missing = sorted(set(selected) - set(factors))
    if missing:
        raise SourceError(
            f"'{ref.text}' targets '{missing[0][len(prefix) :]}' but has no LoRA factors for it; the adapter "
            "file is incomplete"
        )


__all__ = [
    "LORA_MODULES",
    "AdapterSource",
    "LoraModule",
    "check_adapter_base",
    "is_adapter_folder",
    "module_weight_key",
    "open_adapter",
    "open_expert",
    "read_lora_settings",
    "targets_module",
]
