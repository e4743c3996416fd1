"""Model sources: a Hub repo id (``org/name[@revision]``) or a local folder, read one tensor at a time.

`open_source` turns a reference into a [`ModelSource`]: the CLIP vision config of the checkpoint and its vision
tower tensors under one key layout, the transformers-5 `CLIPVisionModel` layout without a `vision_model.` prefix,
whichever way the checkpoint was saved:

- a `CLIPVisionModel` (or `CLIPVisionModelWithProjection`) saved by transformers 4: `vision_model.` prefix;
- the same saved by transformers 5: no prefix;
- a full `CLIPModel`: its vision tower (`vision_model.*`) is used, the text tower and projections are ignored.

Tensors are read from safetensors files (single file or shards with an index) on demand, each read opening the
file briefly, so a merge never keeps whole models mapped in memory. Checkpoints with pickle weights only
(`pytorch_model.bin`) are refused unless the caller allows pickle, because unpickling can run arbitrary code;
even then they are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPVisionConfig, CLIPVisionModel

from hf_wemoe.errors import SourceError
from hf_wemoe.io.hub import hub_unreachable, install_timeouts, is_connection_error, with_retries
from hf_wemoe.io.layout import (
    CONFIG_NAME,
    PICKLE_INDEX_NAME,
    PICKLE_NAME,
    PREPROCESSOR_NAME,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
)
from hf_wemoe.io.weights import check_finite
from hf_wemoe.utils.formatting import one_line

logger = logging.getLogger(__name__)

# Fields that transformers writes into every config.json about the file itself, never about the architecture:
# dropped before a config's values build another config.
CONFIG_METADATA_FIELDS = ("model_type", "transformers_version", "architectures")

# Prefix of the vision tower in transformers-4 `CLIPVisionModel` checkpoints and in full `CLIPModel` ones.
VISION_PREFIX = "vision_model."
# Tensors that are not weights of the vision tower proper (buffers, heads) and are never merged.
_IGNORED_KEYS = ("embeddings.position_ids",)
_IGNORED_PREFIXES = ("visual_projection.", "text_projection.", "text_model.", "logit_scale")
# Model types whose config describes a CLIP vision tower (directly, or as `vision_config` of a full CLIP).
_VISION_MODEL_TYPE = "clip_vision_model"
_FULL_CLIP_MODEL_TYPE = "clip"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ----------------------------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference: a local folder, or a Hub repo id with an optional revision."""

    text: str
    """The reference as the user wrote it."""
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return self.path is not None

    @property
    def recorded(self) -> str:
        """The reference as recipes and configs record it: a local folder as its absolute path (so a recipe works
        from any directory, e.g. from the model folder), a Hub reference as written."""
        return str(self.path) if self.path is not None else self.text

    def pinned(self, commit: str | None) -> str:
        """The reference with its revision replaced by a resolved commit (Hub), or `recorded` (local)."""
        if self.is_local or commit is None:
            return self.recorded
        return f"{self.repo_id}@{commit}"


def parse_reference(text: str) -> ModelReference:
    """Parse `org/name`, `org/name@revision` or a local folder path.

    An existing path is always a local folder. Otherwise the text must be a Hub repo id; something that looks
    like a path but does not exist is reported as a missing folder.

    Raises:
        SourceError: empty reference, missing local folder, a file instead of a folder, or a malformed repo id.
    """
    text = str(text).strip()
    if not text:
        raise SourceError("empty model reference: give a Hub repo id (org/name[@revision]) or a local folder")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(
                f"'{text}' is a file; pass the folder that holds config.json and the safetensors weights"
            )
        return ModelReference(text=text, path=path.resolve())
    repo_id, _, revision = text.partition("@")
    if looks_like_path(text) or not _HUB_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise SourceError(
            f"no such folder: '{text}' ({path.absolute()}) does not exist, and it is neither an existing local "
            "folder nor a Hub repo id (org/name[@revision]); check the path or the repo name"
        )
    if "@" in text and not revision:
        raise SourceError(f"'{text}' has an empty revision after '@'; write org/name@revision or org/name")
    return ModelReference(text=text, repo_id=repo_id, revision=revision or None)


def looks_like_path(text: str) -> bool:
    """True when a reference can only mean a local folder: it starts with `./`, `../`, `/` or `~`, has more than
    one `/`, or names an entry of an existing folder (`out/model` when `out/` exists)."""
    repo_id = text.partition("@")[0]
    if text.startswith((".", "/", "~", "\\")) or repo_id.count("/") > 1:
        return True
    parent = Path(repo_id).parent
    return parent != Path(".") and parent.is_dir()


# ----------------------------------------------------------------------------------------------------------------
# Tensor files


class SafetensorsFile:
    """One safetensors file whose header is read once; each tensor read opens the file briefly.

    Reopening per read keeps the process from holding whole checkpoints memory-mapped (the pages of a mapped
    file count towards the resident set): at any time only the tensors being merged are in memory.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as handle:
                self.shapes: dict[str, tuple[int, ...]] = {}
                self.dtypes: dict[str, torch.dtype] = {}
                # The dtype names of the header (F32, I32, ...), for messages about dtypes torch has no name for.
                self.raw_dtypes: dict[str, str] = {}
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    self.shapes[key] = tuple(tensor_slice.get_shape())
                    self.raw_dtypes[key] = tensor_slice.get_dtype()
                    self.dtypes[key] = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.uint8)
        except (SafetensorError, OSError, ValueError) as err:
            raise SourceError(
                f"cannot read safetensors file '{path}': {one_line(err)}; the file is corrupt or incomplete, "
                "delete it (or the Hub cache entry) and download it again"
            ) from err

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise SourceError(f"cannot read tensor '{key}' from '{self.path}': {one_line(err)}") from err


class PickleFile:
    """A `pytorch_model.bin` loaded with `torch.load(weights_only=True)` (memory-mapped when possible)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                self.state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise SourceError(
                f"'{path}' holds more than tensors, which torch.load(weights_only=True) refuses (UnpicklingError); "
                "a file like this can run code when loaded without that check: do not use it"
            ) from err
        except Exception as err:  # noqa: BLE001 -- any unpickling failure is a bad checkpoint
            raise SourceError(
                f"cannot load '{path}' with torch.load(weights_only=True): {one_line(err)}"
            ) from err
        if not isinstance(self.state, dict):
            raise SourceError(f"'{path}' does not hold a state dict (found {type(self.state).__name__})")
        self.state = {k: v for k, v in self.state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {key: tuple(tensor.shape) for key, tensor in self.state.items()}
        self.dtypes = {key: tensor.dtype for key, tensor in self.state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.state[key].clone()


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class ModelSource:
    """A CLIP vision checkpoint opened lazily.

    `keys` are the vision tower's tensor names in the transformers-5 `CLIPVisionModel` layout (no
    `vision_model.` prefix), in the order of that model's state dict; `get(key)` reads one tensor.
    """

    reference: ModelReference
    folder: Path
    config: CLIPVisionConfig
    layout: str
    """`"clip_vision"` (no prefix), `"clip_vision_prefixed"` (`vision_model.` prefix) or `"clip"` (full CLIP)."""
    commit: str | None
    """Resolved Hub commit sha, or `sha256:<hex>` of the files read from a local folder."""
    weight_files: list[Path] = field(default_factory=list)
    _files: dict[str, SafetensorsFile | PickleFile] = field(default_factory=dict, repr=False)
    _names: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> list[str]:
        """The vision tower's tensor names (normalised layout)."""
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key`, from the file header (no data read)."""
        return self._files[key].shapes[self._names[key]]

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of tensor `key`, from the file header (no data read)."""
        return self._files[key].dtypes[self._names[key]]

    def get(self, key: str) -> torch.Tensor:
        """Read tensor `key` (normalised name) from disk.

        Raises:
            SourceError: no such tensor, or one with NaN or infinite values (a merge would spread them silently).
        """
        try:
            stored = self._names[key]
        except KeyError:
            raise SourceError(f"'{self.reference.text}' has no tensor '{key}'") from None
        tensor = self._files[key].get(stored)
        check_finite(tensor, f"tensor '{key}' of '{self.reference.text}'")
        return tensor

    @property
    def preprocessor_config(self) -> Path | None:
        """The checkpoint's `preprocessor_config.json`, when it has one."""
        path = self.folder / PREPROCESSOR_NAME
        return path if path.is_file() else None

    @property
    def is_hub(self) -> bool:
        """True when the source was downloaded from the Hub."""
        return not self.reference.is_local

    def provenance(self) -> dict:
        """What was read: the reference, where it came from and the resolved revision."""
        record = {"ref": self.reference.recorded, "source": "local" if self.reference.is_local else "hub"}
        if self.reference.is_local:
            record["content_sha256"] = self.commit.removeprefix("sha256:") if self.commit else None
        else:
            record.update(
                repo_id=self.reference.repo_id, revision=self.reference.revision, commit=self.commit
            )
        record["layout"] = self.layout
        return record

    def total_numel(self) -> int:
        """Number of elements in the vision tower's tensors."""
        return sum(math.prod(self.shape(key)) for key in self._names)


def open_source(
    reference: str | ModelReference, *, allow_pickle: bool = False, hash_local: bool = True
) -> ModelSource:
    """Open a model reference (Hub repo id with optional `@revision`, or local folder) for lazy reading.

    Hub references are resolved to a commit and only the files a merge needs are downloaded (config,
    safetensors weights and index, preprocessor config; pickle weights only with `allow_pickle`). For local
    folders, `hash_local` records a sha256 of the files read as their revision.

    Raises:
        SourceError: unknown repo or revision, no readable weights, pickle weights without `allow_pickle`, a
            corrupt file, or a config that is not a CLIP (vision) config.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(reference)
    if ref.is_local:
        folder = ref.path
        weights, kind = _choose_local_weights(folder, ref, allow_pickle)
    else:
        folder, weights, kind, commit = _download(ref, allow_pickle)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise SourceError(f"'{ref.text}' has no {CONFIG_NAME}; a CLIP checkpoint folder needs one")
    config = read_vision_config(config_path, ref.text)
    if ref.is_local:
        commit = content_hash([config_path, *weights]) if hash_local else None
    files = [SafetensorsFile(path) if kind == "safetensors" else PickleFile(path) for path in weights]
    source = ModelSource(
        reference=ref, folder=folder, config=config, layout="", commit=commit, weight_files=weights
    )
    _index_tensors(source, files)
    logger.debug(
        "opened %s: %s layout, %d tensors, revision %s", ref.text, source.layout, len(source.keys), commit
    )
    return source


def read_vision_config(path: Path, what: str = "") -> CLIPVisionConfig:
    """The `CLIPVisionConfig` in a `config.json` of a CLIP vision model or of a full CLIP model."""
    what = what or str(path.parent)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read {path}: {one_line(err)}") from err
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type == _FULL_CLIP_MODEL_TYPE:
        data = data.get("vision_config") or {}
    elif model_type != _VISION_MODEL_TYPE:
        raise SourceError(
            f"'{what}' is a '{model_type}' model; expected a CLIP vision model ('{_VISION_MODEL_TYPE}') or a "
            f"full CLIP model ('{_FULL_CLIP_MODEL_TYPE}') fine-tuned from the same base"
        )
    values = {k: v for k, v in data.items() if k not in CONFIG_METADATA_FIELDS}
    try:
        return CLIPVisionConfig(**values)
    except (TypeError, ValueError, StrictDataclassError) as err:
        raise SourceError(f"invalid CLIP vision config in '{what}': {one_line(err)}") from err


def expected_keys(config: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a `CLIPVisionModel` with this config (built on the meta device)."""
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Internals


def _dtype_name(source: ModelSource, key: str) -> str:
    stored = source._files[key]
    raw = getattr(stored, "raw_dtypes", {}).get(source._names[key])
    return raw or str(source.dtype(key)).removeprefix("torch.")


def pickle_refusal(ref: ModelReference, name: str) -> SourceError:
    """The one-line refusal of a checkpoint whose only weights are pickle (which can run code when loaded)."""
    return SourceError(
        f"'{ref.text}' only has pickle weights ({name}); loading pickle can execute arbitrary code, so it is "
        "refused. Convert the checkpoint to safetensors, or pass --allow-pickle if you trust its author "
        "(it is then loaded with torch.load(weights_only=True))"
    )


def _weights_from_names(names: set[str], read_index, ref: ModelReference, allow_pickle: bool):
    """Pick weight files from the file names of a checkpoint: (file names, "safetensors" | "pickle")."""
    if SAFETENSORS_INDEX_NAME in names:
        return sorted(set(read_index(SAFETENSORS_INDEX_NAME).values())), "safetensors"
    if SAFETENSORS_NAME in names:
        return [SAFETENSORS_NAME], "safetensors"
    pickled = (
        PICKLE_INDEX_NAME if PICKLE_INDEX_NAME in names else PICKLE_NAME if PICKLE_NAME in names else None
    )
    if pickled is None:
        raise SourceError(
            f"'{ref.text}' has no model weights ({SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}); "
            "point to a folder or repo with a saved CLIP vision model"
        )
    if not allow_pickle:
        raise pickle_refusal(ref, pickled)
    if pickled == PICKLE_INDEX_NAME:
        return sorted(set(read_index(PICKLE_INDEX_NAME).values())), "pickle"
    return [PICKLE_NAME], "pickle"


def _read_weight_map(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("'weight_map' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SourceError(f"cannot read the shard index '{path}': {one_line(err)}") from err
    for name in weight_map.values():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise SourceError(f"the shard index '{path}' names an invalid file {name!r}")
    return weight_map


def _choose_local_weights(folder: Path, ref: ModelReference, allow_pickle: bool) -> tuple[list[Path], str]:
    names = {p.name for p in folder.iterdir() if p.is_file()}
    files, kind = _weights_from_names(names, lambda name: _read_weight_map(folder / name), ref, allow_pickle)
    missing = [name for name in files if name not in names]
    if missing:
        raise SourceError(f"'{ref.text}' lists shard '{missing[0]}' in its index, but the file is missing")
    return [folder / name for name in files], kind


def content_hash(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths`, in order: the revision of a local checkpoint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def hub_model_info(ref: ModelReference):
    """Ask the Hub about the repo of `ref` at its revision (bounded time and retries): its commit and files.

    Raises:
        SourceError: gated repo, unknown revision, unknown repo (the message also names the local folder that was
            looked for), or a Hub that cannot be reached (naming the endpoint and what to try).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"the Hub ({constants.ENDPOINT})"
    try:
        return with_retries(
            lambda: HfApi().model_info(ref.repo_id, revision=ref.revision),
            f"find model repo '{ref.repo_id}'",
        )
    except GatedRepoError as err:
        raise SourceError(
            f"'{ref.repo_id}' is gated on {where}: accept its conditions on the Hub and log in (`hf auth login`)"
        ) from err
    except RevisionNotFoundError as err:
        raise SourceError(
            f"revision '{ref.revision}' not found in Hub repo '{ref.repo_id}'; check the branch, tag or commit"
        ) from err
    except RepositoryNotFoundError as err:
        folder = Path(ref.repo_id).expanduser().absolute()
        raise SourceError(
            f"'{ref.text}' is not a local folder (no folder {folder}) and not a reachable Hub repo: "
            f"'{ref.repo_id}' was not found on {where}; check the path or the repo name (log in with "
            "`hf auth login` for a private repo)"
        ) from err


def _download(ref: ModelReference, allow_pickle: bool) -> tuple[Path, list[Path], str, str]:
    """Resolve a Hub reference to a commit and download the files a merge reads."""
    commit, names = hub_listing(ref)
    with hub_errors(ref):
        from huggingface_hub import hf_hub_download

        def read_index(name: str) -> dict[str, str]:
            path = hf_hub_download(ref.repo_id, name, revision=commit)
            return _read_weight_map(Path(path))

        files, kind = _weights_from_names(names, read_index, ref, allow_pickle)
    wanted = [CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_INDEX_NAME, *files]
    if kind == "pickle":
        wanted.append(PICKLE_INDEX_NAME)
    folder = hub_snapshot(ref, commit, [name for name in wanted if name in names])
    return folder, [folder / name for name in files], kind, commit


@contextlib.contextmanager
def hub_errors(ref: ModelReference) -> Iterator[None]:
    """Turn network and HTTP failures while reading `ref` from the Hub into one readable `SourceError` line
    (`SourceError`s pass through)."""
    from huggingface_hub import constants

    install_timeouts()
    try:
        yield
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 -- network and HTTP failures become one readable line
        if is_connection_error(err):
            raise hub_unreachable(err, f"download '{ref.text}'") from err
        raise SourceError(
            f"cannot download '{ref.text}' from the Hub ({constants.ENDPOINT}): {one_line(err)}"
        ) from err


def hub_listing(ref: ModelReference) -> tuple[str, set[str]]:
    """The commit `ref` resolves to on the Hub and the names of the files at that commit."""
    with hub_errors(ref):
        info = hub_model_info(ref)
        return info.sha, {sibling.rfilename for sibling in info.siblings or []}


def hub_snapshot(ref: ModelReference, commit: str, names: list[str]) -> Path:
    """Download the files `names` of `ref` at `commit` (from the cache when there); returns their folder."""
    from huggingface_hub import snapshot_download

    with hub_errors(ref):
        return Path(snapshot_download(ref.repo_id, revision=commit, allow_patterns=names))


def _index_tensors(source: ModelSource, files: list[SafetensorsFile | PickleFile]) -> None:
    """Map normalised vision tower keys to their files and stored names; detect the layout; check the config."""
    stored: dict[str, SafetensorsFile | PickleFile] = {}
    for handle in files:
        for key in handle.shapes:
            stored[key] = handle
    prefixed = any(key.startswith(VISION_PREFIX) for key in stored)
    full_clip = any(key.startswith(("text_model.", "logit_scale", "text_projection.")) for key in stored)
    source.layout = "clip" if full_clip else "clip_vision_prefixed" if prefixed else "clip_vision"
    names: dict[str, str] = {}
    for key in stored:
        if prefixed:
            if not key.startswith(VISION_PREFIX):
                continue
            name = key[len(VISION_PREFIX) :]
        else:
            name = key
        if name in _IGNORED_KEYS or name.startswith(_IGNORED_PREFIXES):
            continue
        names[name] = key
    expected = expected_keys(source.config)
    missing = [key for key in expected if key not in names]
    extra = [key for key in names if key not in expected]
    if missing or extra:
        what = f"lacks tensor '{missing[0]}'" if missing else f"has tensor '{extra[0]}'"
        raise SourceError(
            f"'{source.reference.text}' {what} but its config.json says otherwise "
            f"({len(missing)} missing, {len(extra)} unexpected); is it a CLIP vision model saved with transformers?"
        )
    # Canonical order: the CLIPVisionModel state dict's.
    source._names = {key: names[key] for key in expected}
    source._files = {key: stored[names[key]] for key in expected}
    for key, shape in expected.items():
        if not source.dtype(key).is_floating_point:
            # Read as floats, integer data would become huge task vectors; a float header never lies that way.
            raise SourceError(
                f"'{source.reference.text}' tensor '{key}' is stored as {_dtype_name(source, key)}, but a CLIP "
                "weight must be a floating-point tensor; the checkpoint is damaged or was not written by a model"
            )
        if source.shape(key) != shape:
            raise SourceError(
                f"'{source.reference.text}' tensor '{key}' has shape {source.shape(key)}, its config.json "
                f"implies {shape}; the checkpoint and its config disagree"
            )


__all__ = [
    "CONFIG_METADATA_FIELDS",
    "ModelReference",
    "ModelSource",
    "PickleFile",
    "SafetensorsFile",
    "content_hash",
    "expected_keys",
    "hub_errors",
    "hub_listing",
    "hub_model_info",
    "hub_snapshot",
    "looks_like_path",
    "open_source",
    "parse_reference",
    "pickle_refusal",
    "read_vision_config",
]
