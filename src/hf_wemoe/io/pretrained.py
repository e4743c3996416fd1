"""Saved models loaded through transformers (what train and eval read), under the same rules as a merge.

- References resolve like merge sources (`parse_reference`): something that can only be a path and does not exist
  is a missing folder at once; a Hub id is looked up with bounded time and retries, and an unreachable Hub falls
  back to the local Hub cache when the model is there.
- Pickle weights (`pytorch_model.bin`) are refused unless the caller allows them; then transformers loads them with
  `torch.load(weights_only=True)`, and a refused or malicious pickle is one line, not a traceback.
- The weights must fit the model exactly: a missing, unexpected or misshapen tensor (a config.json edited apart
  from its weights) is an error naming the first one, where transformers would only log it and go on with
  randomly initialised or dropped tensors. Nothing is loaded with `trust_remote_code`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from hf_wemoe.errors import SourceError
from hf_wemoe.io.hub import install_timeouts, is_connection_error, offline
from hf_wemoe.io.layout import CONFIG_NAME
from hf_wemoe.io.sources import (
    PICKLE_INDEX_NAME,
    PICKLE_NAME,
    ModelReference,
    hub_model_info,
    parse_reference,
    pickle_refusal,
)
from hf_wemoe.utils.formatting import first_line, one_line

logger = logging.getLogger(__name__)

_PICKLE_NAMES = (PICKLE_NAME, PICKLE_INDEX_NAME)


@dataclass(frozen=True)
class PretrainedLocation:
    """Where `from_pretrained` reads a model reference from, and how."""

    reference: ModelReference
    name_or_path: str
    """The local folder, or the Hub repo id."""
    revision: str | None
    local_files_only: bool = False
    """True when the Hub could not be reached and the model is read from the local Hub cache."""
    pickle: bool = False
    """True when the weights are pickle (`pytorch_model.bin`), which the caller allowed."""

    @property
    def text(self) -> str:
        """The reference as the user wrote it."""
        return self.reference.text

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` of configs, tokenizers and processors."""
        return {"revision": self.revision, "local_files_only": self.local_files_only}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` of models: safetensors only, unless pickle was allowed."""
        return {**self.load_kwargs(), "use_safetensors": None if self.pickle else True}


def locate_pretrained(
    reference: str | Path | ModelReference, *, allow_pickle: bool = False, need_weights: bool = True
) -> PretrainedLocation:
    """Resolve a model reference for `from_pretrained`, checking the pickle policy on its weight files.

    Raises:
        SourceError: a missing folder, an unknown or unreachable Hub repo (not in the local cache), no weights
            (with `need_weights`), or only pickle weights without `allow_pickle`.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(str(reference))
    if ref.is_local:
        names = {path.name for path in ref.path.iterdir() if path.is_file()}
        location = PretrainedLocation(ref, str(ref.path), None)
    else:
        names, cached_only = _hub_file_names(ref)
        location = PretrainedLocation(ref, ref.repo_id, ref.revision, local_files_only=cached_only)
    if names is None:  # offline or read from the cache: transformers reports missing files itself
        return location
    has_safetensors = any(name.endswith(".safetensors") for name in names)
    pickled = [name for name in _PICKLE_NAMES if name in names]
    if has_safetensors or not need_weights:
        return location
    if pickled:
        if not allow_pickle:
            raise pickle_refusal(ref, pickled[0])
        return PretrainedLocation(
            ref, location.name_or_path, location.revision, location.local_files_only, pickle=True
        )
    raise SourceError(
        f"'{ref.text}' has no model weights (model.safetensors or model.safetensors.index.json); point to a "
        "folder or repo with a saved model"
    )


def _hub_file_names(ref: ModelReference) -> tuple[set[str] | None, bool]:
    """The repo's file names (None when unknown) and whether to read from the local cache only."""
    if offline():
        return None, False
    install_timeouts()
    try:
        info = hub_model_info(ref)
    except SourceError as err:
        # Only a Hub that cannot be reached falls back to the cache; its answers ("not found", "gated") stand.
        if not is_connection_error(err.__cause__) or not _in_local_cache(ref):
            raise
        logger.warning("%s; using the copy of %s in the local Hub cache", err, ref.text)
        return None, True
    return {sibling.rfilename for sibling in info.siblings or []}, False


def _in_local_cache(ref: ModelReference) -> bool:
    return isinstance(try_to_load_from_cache(ref.repo_id, CONFIG_NAME, revision=ref.revision), str)


def load_config(location: PretrainedLocation, what: str = "model") -> Any:
    """`AutoConfig.from_pretrained`, with a config.json that is missing, malformed or has wrongly typed fields
    reported in one line."""
    install_timeouts()
    try:
        return AutoConfig.from_pretrained(location.name_or_path, **location.load_kwargs())
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise SourceError(f"cannot load {what} {location.text}: {_describe(err)}") from err


def load_model(
    model_class: Any,
    location: PretrainedLocation,
    what: str = "model",
    *,
    ignore_unexpected: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """`model_class.from_pretrained(location)` whose weights must fit the model exactly.

    Stored tensors whose names start with one of `ignore_unexpected` may be left unused.

    Raises:
        SourceError: the model cannot be loaded (naming why, in one line: a config that does not fit, a refused
            or malicious pickle, a corrupt file), or a tensor is missing, unexpected or of another shape than
            the config implies (naming the first one).
    """
    install_timeouts()
    try:
        model, info = model_class.from_pretrained(
            location.name_or_path,
            **location.model_kwargs(),
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below by name, instead of a multi-line report
            **kwargs,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, StrictDataclassError) as err:
        raise SourceError(f"cannot load {what} {location.text}: {_describe(err)}") from err
    except pickle.UnpicklingError as err:
        raise SourceError(
            f"cannot load {what} {location.text}: its pickle weights hold more than tensors, which "
            "torch.load(weights_only=True) refuses (UnpicklingError); a file like this can run code when loaded "
            "without that check: do not use it"
        ) from err
    except Exception as err:  # noqa: BLE001 -- any other failure inside a library's loader is still one line
        raise SourceError(f"cannot load {what} {location.text}: {type(err).__name__}: {first_line(err)}") from err
    info["unexpected_keys"] = {
        key for key in info.get("unexpected_keys") or () if not key.startswith(ignore_unexpected)
    }
    check_loading_info(info, model, f"{what} {location.text}")
    return model


def _describe(err: BaseException) -> str:
    """The reason of a load failure in one line: the first line of the libraries' long messages, all of the
    short multi-line ones of strict config validation ("Validation error for field 'x':" + the cause)."""
    return one_line(err) if isinstance(err, StrictDataclassError) else first_line(err)


def check_loading_info(info: dict[str, Any], model: Any, what: str) -> None:
    """Raise `SourceError` naming the first missing, unexpected or misshapen tensor of a `from_pretrained`."""
    order = {key: i for i, key in enumerate(model.state_dict())}

    def first(keys: Any) -> str:
        return sorted(keys, key=lambda key: (order.get(key, len(order)), key))[0]

    hint = "its config.json does not match its weights (edited, or from another model); re-save the model"
    mismatched = {entry[0]: entry for entry in info.get("mismatched_keys") or ()}
    if mismatched:
        key = first(mismatched)
        _, stored, expected = mismatched[key]
        raise SourceError(
            f"{what}: weight '{key}' has shape {tuple(stored)}, the model expects {tuple(expected)} "
            f"({len(mismatched)} mismatched); {hint}"
        )
    missing = info.get("missing_keys") or ()
    if missing:
        raise SourceError(f"{what} lacks weight '{first(missing)}' ({len(missing)} missing); {hint}")
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        raise SourceError(
            f"{what} has weight '{first(unexpected)}' that the model does not use ({len(unexpected)} "
            f"unexpected); {hint}"
        )
    errors = info.get("error_msgs") or ()
    if errors:
        raise SourceError(f"{what}: {first_line(str(errors[0]))}")


__all__ = ["PretrainedLocation", "check_loading_info", "load_config", "load_model", "locate_pretrained"]
