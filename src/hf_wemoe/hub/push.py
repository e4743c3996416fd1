"""The push workflow behind `hf-wemoe push` and `--push-to-hub`: a model folder to a Hub repo in one commit.

Before anything is sent, the folder is proven to be a working model: it is loaded once with the class its config
names (WEMoE vision tower, full WEMoE CLIP, or a plain CLIP (vision) model), every weight must match the model,
one forward pass must run, and the files that remote code, pipelines and widgets need must be there. The model
card is rendered for the repo id. Then the repo is created when missing and the whole folder goes up with a single
`HfApi.upload_folder` commit, which also deletes files of an earlier push that the folder no longer has: the
repo shows either the previous commit or the new one, never a mix.

Only regular files inside the folder are sent (a symbolic link out of it is refused), and only finite weights.
Every request has a timeout (`hf_wemoe.io.hub`); transient failures (HTTP 408/429/5xx, connection errors) are
retried a bounded number of times with exponential backoff on the calls huggingface_hub does not retry itself; other
failures are reported as one line. A repo created by a push that then fails is deleted again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hf_wemoe.errors import WEMoEError
from hf_wemoe.io.hub import hub_timeout, hub_unreachable, install_timeouts, is_transient, with_retries
from hf_wemoe.io.layout import CARD_NAME, CONFIG_NAME, PREPROCESSOR_NAME, TOKENIZER_CONFIG_NAME
from hf_wemoe.io.outputs import make_staging_dir, remove_stale_staging
from hf_wemoe.utils.formatting import first_line, format_size, one_line
from hf_wemoe.utils.progress import log_stage, progress_enabled, quiet_libraries

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Never uploaded: hidden files, caches, leftovers of interrupted writes.
IGNORE_PATTERNS = [".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "*.pyc", "*.tmp-*", "*.partial"]
# Temporary upload folders: `<tmp>/hf-wemoe-push-<host>-<pid>-XXXX`.
STAGING_STEM = "hf-wemoe-push"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# `from .name import ...` in a model code file: a sibling file that trust_remote_code also loads.
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)


@dataclass
class ModelFolder:
    """A model folder that loaded and ran: what it is and what it holds."""

    path: Path
    model_type: str
    model_class: str
    is_wemoe: bool
    full_clip: bool
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PushResult:
    """What a push did."""

    repo_id: str
    url: str
    commit_url: str
    commit_oid: str
    files: list[str]
    size_bytes: int
    created: bool

    def line(self) -> str:
        """A one-line summary for the command line."""
        return (
            f"pushed {len(self.files)} files ({format_size(self.size_bytes)}) to {self.url} "
            f"({'new repo' if self.created else 'existing repo'}), commit {self.commit_oid[:12]}: {self.commit_url}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Checks before any network call


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` stripped, or raise `WEMoEError` unless it is a valid ORG/NAME Hub model repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(repo_id or "").strip()
    hint = "expected ORG/NAME, e.g. my-user/wemoe-vit-b32 (letters, digits, '-', '_', '.')"
    if "@" in text:
        raise WEMoEError(f"invalid repo id '{text}': give the branch with --branch, not @; {hint}")
    if not _REPO_ID.match(text):
        raise WEMoEError(f"invalid repo id '{text}': {hint}")
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        reason = str(err).split(".")[0]
        raise WEMoEError(f"invalid repo id '{text}': {reason}; {hint}") from None
    return text


def check_token(token: str | None = None) -> str:
    """The token to push with (`token`, else HF_TOKEN or the one saved by `hf auth login`), or a one-line error."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise WEMoEError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access"
        )
    return token


def validate_model_folder(folder: str | Path) -> ModelFolder:
    """Load the model in `folder` once and run it, or raise `WEMoEError` saying what is broken.

    Checks: config.json names a WEMoE or CLIP model; its weights load with no missing, unexpected or misshapen
    tensor, each of the model's kind of dtype and with finite values; one forward pass runs; no file is a symbolic
    link out of the folder; WEMoE folders carry the code files their `auto_map` names; full CLIP models
    have a tokenizer and an image processor. A vision tower without `preprocessor_config.json` is accepted with a
    warning (pipelines need it).
    """
    import torch

    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise WEMoEError(f"'{folder}' {what}; pass the model folder written by hf-wemoe merge or train")
    if not (path / CONFIG_NAME).is_file():
        raise WEMoEError(
            f"'{folder}' is not a model folder: it has no {CONFIG_NAME}; pass the folder written by hf-wemoe "
            "merge or train"
        )
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise WEMoEError(f"'{folder}/{CONFIG_NAME}' is not valid JSON: {one_line(err)}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    classes = model_classes()
    if model_type not in classes:
        raise WEMoEError(
            f"'{folder}' holds a {model_type!r} model; hf-wemoe push uploads WEMoE models and CLIP (vision) models "
            "merged by hf-wemoe"
        )
    model_class, is_wemoe, full_clip = classes[model_type]
    info = ModelFolder(path, model_type, model_class.__name__, is_wemoe, full_clip)
    # torch-side imports stay inside the functions that load a model: `hf-wemoe push --help` and the repo-id and
    # token checks that merge and train run first need none of them.
    from hf_wemoe.io.weights import weight_files

    if not weight_files(path):
        raise WEMoEError(
            f"'{folder}' has no model weights (model.safetensors or a shard index); nothing to push"
        )
    if is_wemoe:
        _check_code_files(path, config)
    try:
        config_object = model_class.config_class.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 -- invalid fields of any kind
        raise WEMoEError(
            f"'{folder}/{CONFIG_NAME}' is not a valid {model_type} config: {one_line(err)}"
        ) from err
    # The weights are checked against the model's own tensors first (a model on the meta device costs nothing):
    # transformers would fill missing ones with random values and only warn.
    with torch.device("meta"):
        skeleton = model_class(config_object)
    _check_weights(path, skeleton)
    try:
        with quiet_libraries():
            model = model_class.from_pretrained(path, use_safetensors=True)  # never a pickle file
    except Exception as err:  # noqa: BLE001 -- any load failure means the folder is broken
        raise WEMoEError(f"'{folder}' does not load as a {model_class.__name__}: {one_line(err)}") from err
    if full_clip:
        tokenizer, processor = _load_processors(path)
    else:
        tokenizer, processor = None, None
        if not (path / PREPROCESSOR_NAME).is_file():
            info.warnings.append(
                f"'{folder}' has no {PREPROCESSOR_NAME}: pipelines and the Hub widget need it (copy the base "
                "model's image processor config into the folder)"
            )
    try:
        with torch.no_grad():
            _dummy_forward(model, tokenizer, processor)
    except Exception as err:  # noqa: BLE001
        raise WEMoEError(f"the model in '{folder}' loads but does not run: {one_line(err)}") from err
    info.files = _files_to_upload(path)
    return info


def model_classes() -> dict[str, tuple[Any, bool, bool]]:
    """config.json model_type -> (model class, is WEMoE, is a full CLIP model), for the kinds of `MODEL_KINDS`."""
    # Imported here, like the other torch-side imports of this module, to keep `hf-wemoe push --help` fast.
    from transformers import CLIPModel, CLIPVisionModel

    from hf_wemoe.hub.cards import MODEL_KINDS
    from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
    from hf_wemoe.models.modeling_wemoe_clip import WEMoECLIPModel

    classes = {
        "wemoe_clip_vision_model": WEMoECLIPVisionModel,
        "wemoe_clip": WEMoECLIPModel,
        "clip_vision_model": CLIPVisionModel,
        "clip": CLIPModel,
    }
    return {model_type: (classes[model_type], *kind) for model_type, kind in MODEL_KINDS.items()}


def _check_code_files(path: Path, config: dict[str, Any]) -> None:
    """`trust_remote_code` loads the files `auto_map` names: they must be in the folder, with their siblings."""
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map or "AutoConfig" not in auto_map:
        raise WEMoEError(
            f"'{path}/{CONFIG_NAME}' has no auto_map for AutoConfig and AutoModel, so trust_remote_code cannot "
            "load it; re-save the model with save_pretrained"
        )
    modules = {str(entry).rsplit(".", 1)[0] for entry in auto_map.values() if isinstance(entry, str)}
    needed = _with_sibling_imports(path, modules | {"configuration_wemoe", "modeling_wemoe"})
    missing = [f"{name}.py" for name in sorted(needed) if not (path / f"{name}.py").is_file()]
    if missing:
        raise WEMoEError(
            f"'{path}' lacks the model code file {missing[0]} that trust_remote_code loads; re-save the model "
            "with save_pretrained"
        )


def _with_sibling_imports(path: Path, modules: set[str]) -> set[str]:
    """`modules` and every module they import relatively (`from .name import ...`), read from the folder's files."""
    needed, pending = set(modules), list(modules)
    while pending:
        file = path / f"{pending.pop()}.py"
        if not file.is_file():
            continue
        for name in _RELATIVE_IMPORT.findall(file.read_text(encoding="utf-8")):
            if name not in needed:
                needed.add(name)
                pending.append(name)
    return needed


def _check_weights(path: Path, model: Any) -> None:
    """Every tensor of the model is in the weight files with its shape, and the files hold nothing else."""
    from hf_wemoe.io.weights import tensor_shapes  # torch-side: imported on use, for start-up time

    try:
        stored = {key: shape for key, (shape, _) in tensor_shapes(path).items()}
    except Exception as err:  # noqa: BLE001 -- unreadable or corrupt safetensors files
        raise WEMoEError(f"the weights in '{path}' cannot be read: {one_line(err)}") from err
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in stored]
    unexpected = [key for key in stored if key not in expected]
    wrong = [key for key in expected if key in stored and tuple(stored[key]) != expected[key]]
    if missing:
        raise WEMoEError(
            f"'{path}' lacks weight '{missing[0]}' ({len(missing)} missing); the folder is incomplete or its "
            f"config.json does not match its weights"
        )
    if unexpected:
        raise WEMoEError(
            f"'{path}' has weight '{unexpected[0]}' that the model does not use ({len(unexpected)} unexpected); "
            "its config.json does not match its weights"
        )
    if wrong:
        key = wrong[0]
        raise WEMoEError(
            f"'{path}' weight '{key}' has shape {tuple(stored[key])}, the model expects {expected[key]}; its "
            "config.json does not match its weights"
        )
    _check_values(path, model)


def _check_values(path: Path, model: Any) -> None:
    """Every weight has the model's kind of dtype (a float stored as integers would load as garbage) and finite
    values (a NaN model would be published); tensors are read one at a time."""
    # Imported here like this module's other torch-side imports: checking a repo id or token needs none of them.
    from safetensors import safe_open

    from hf_wemoe.io.weights import check_finite, weight_files

    floating = {key: value.dtype.is_floating_point for key, value in model.state_dict().items()}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                stored = handle.get_slice(key).get_dtype()
                if floating.get(key, True) != _is_float_dtype(stored):
                    kind = "a floating-point" if floating.get(key, True) else "an integer"
                    raise WEMoEError(
                        f"'{path}' weight '{key}' is stored as {stored}, the model expects {kind} tensor; the "
                        "weights are damaged or were not written for this model"
                    )
                if floating.get(key, True):
                    check_finite(handle.get_tensor(key), f"'{path}' weight '{key}'")


def _is_float_dtype(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"


def _load_processors(path: Path) -> tuple[Any, Any]:
    """The tokenizer and image processor a full CLIP model needs for zero-shot pipelines."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if not (path / TOKENIZER_CONFIG_NAME).is_file():
        raise WEMoEError(
            f"'{path}' is a full CLIP model without a tokenizer ({TOKENIZER_CONFIG_NAME}); zero-shot pipelines "
            "need it: save the base model's tokenizer into the folder"
        )
    if not (path / PREPROCESSOR_NAME).is_file():
        raise WEMoEError(
            f"'{path}' is a full CLIP model without {PREPROCESSOR_NAME}; zero-shot pipelines need it: save the "
            "base model's image processor into the folder"
        )
    try:
        with quiet_libraries():
            return AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise WEMoEError(
            f"the tokenizer or image processor in '{path}' does not load: {one_line(err)}"
        ) from err


def _dummy_forward(model: Any, tokenizer: Any, processor: Any) -> None:
    """One forward pass on a blank image (and a short text for full CLIP models)."""
    import torch

    vision_config = getattr(model.config, "vision_config", model.config)
    size = int(vision_config.image_size)
    pixels = torch.zeros(1, int(vision_config.num_channels), size, size, dtype=model.dtype)
    if tokenizer is None:
        model.eval()(pixel_values=pixels)
        return
    text = tokenizer(["a photo"], return_tensors="pt", padding=True)
    outputs = model.eval()(pixel_values=pixels, **text)
    if not torch.isfinite(outputs.logits_per_image).all():
        raise ValueError("the image-text logits are not finite")


def _files_to_upload(path: Path) -> list[str]:
    """The files to push; a symbolic link that leads out of the folder is refused (it could publish a token or
    any other file of the machine)."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    names = list(filter_repo_objects(names, ignore_patterns=IGNORE_PATTERNS))
    root = path.resolve()
    for name in names:
        target = (path / name).resolve()
        if not target.is_relative_to(root):
            raise WEMoEError(
                f"'{path / name}' is a symbolic link to '{target}', outside the folder; hf-wemoe push never "
                "uploads files from outside the model folder: remove the link, or replace it with a copy of the file"
            )
    return names


# ----------------------------------------------------------------------------------------------------------------
# The push


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    keep_card: bool = False,
    max_attempts: int = 5,
    backoff: float = 1.0,
    show_progress: bool | None = None,
) -> PushResult:
    """Push a model folder to the Hub repo `repo_id` as one commit.

    Args:
        folder: a model folder written by `hf-wemoe merge` or `hf-wemoe train`.
        repo_id: ORG/NAME of the Hub model repo; created when missing.
        private: create the repo as private (an existing repo keeps its visibility).
        branch: commit to this branch (created from `main` when missing) instead of `main`.
        commit_message: the commit title (default: says what was pushed).
        token: the Hub token (default: HF_TOKEN or the saved login).
        keep_card: upload the folder's README.md as it is instead of rendering the card for `repo_id`.
        max_attempts, backoff: tries per Hub call on transient errors, and the first wait in seconds (doubled each
            try, at most 30 s).
        show_progress: report the upload (huggingface_hub's bars on a terminal, a log line elsewhere); by default
            unless `--quiet` or `HF_HUB_DISABLE_PROGRESS_BARS` (see `hf_wemoe.utils.progress`).

    Raises:
        WEMoEError: malformed repo id, no token, a broken model folder, or a Hub error (one line). Nothing is
            committed then, and a repo this push created is deleted again.
    """
    repo_id = check_repo_id(repo_id)
    token = check_token(token)
    if branch is not None and not str(branch).strip():
        raise WEMoEError("empty --branch; give a branch name or leave it out to push to main")
    model = validate_model_folder(folder)
    for warning in model.warnings:
        logger.warning(warning)
    show_progress = progress_enabled(show_progress)

    from huggingface_hub import HfApi

    install_timeouts()
    api = HfApi(token=token)
    retry = _Retry(max_attempts, backoff, repo_id)
    with _upload_staging(model, repo_id, keep_card) as staging, quiet_libraries(show_progress):
        exists = retry(lambda: api.repo_exists(repo_id), "check the repo")
        created = False
        try:
            if not exists:
                retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create the repo")
                created = True
            elif private:
                logger.warning("%s already exists: --private only applies to new repos", repo_id)
            if branch and branch != "main":
                retry(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), "create the branch")
            message = commit_message or _default_message(model)
            log_stage(f"push: uploading {len(_staged_names(model))} files to {repo_id}", show_progress)
            info = retry(
                lambda: api.upload_folder(
                    repo_id=repo_id,
                    folder_path=str(staging),
                    revision=branch,
                    commit_message=message,
                    delete_patterns="*",
                ),
                "upload the folder",
            )
        except BaseException:
            if created:
                _delete_created_repo(api, repo_id)
            raise
    _warn_about_local_sources(model.path)
    size = sum((model.path / name).stat().st_size for name in model.files if (model.path / name).is_file())
    return PushResult(
        repo_id=repo_id,
        url=str(info.repo_url.url) if getattr(info, "repo_url", None) else f"{api.endpoint}/{repo_id}",
        commit_url=info.commit_url,
        commit_oid=info.oid,
        files=_staged_names(model),
        size_bytes=size,
        created=created,
    )


def _warn_about_local_sources(folder: Path) -> None:
    """After a push: warn when the published card names its sources by local paths and no Hub base model."""
    # Imported here, not at the top: the cards module loads torch, which `hf-wemoe push --help` does not need.
    from hf_wemoe.hub.cards import local_source_paths

    local = local_source_paths(folder)
    if local:
        logger.warning(
            "the model card names the sources by local paths (%s) and no Hub base model, so the paths are "
            "published and the Hub links the model to nothing; merge from Hub repo ids (org/name) to link them",
            ", ".join(local),
        )


def _default_message(model: ModelFolder) -> str:
    kind = (
        "full CLIP model with a WEMoE vision tower"
        if model.is_wemoe and model.full_clip
        else ("WEMoE CLIP vision model" if model.is_wemoe else "merged CLIP model")
    )
    return f"Upload {kind} with hf-wemoe"


def _staged_names(model: ModelFolder) -> list[str]:
    return sorted(set(model.files) | {CARD_NAME})


@contextlib.contextmanager
def _upload_staging(model: ModelFolder, repo_id: str, keep_card: bool) -> Iterator[Path]:
    """A temporary folder with links to the model's files and the card rendered for `repo_id`.

    The model folder itself is not changed. Files are hard-linked when possible (same file system), else
    symbolically linked; upload_folder reads through both. The folder's name carries this process's id, so the
    next push removes what a killed one left behind.
    """
    from hf_wemoe.hub.cards import model_card, validate_card  # torch-side: imported on use, for start-up time

    remove_stale_staging(tempfile.gettempdir(), STAGING_STEM)
    staging = make_staging_dir(tempfile.gettempdir(), STAGING_STEM)
    try:
        for name in model.files:
            if name == CARD_NAME:
                continue
            source, target = model.path / name, staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                os.symlink(source.resolve(), target)
        card_path = model.path / CARD_NAME
        if keep_card and card_path.is_file():
            text = card_path.read_text(encoding="utf-8")
            validate_card(text)
            (staging / CARD_NAME).write_text(text, encoding="utf-8")
        else:
            model_card(model.path, model_id=repo_id).save(staging / CARD_NAME)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Retry:
    """Call a Hub operation with the package's bounded retries; failures become one line (`hub_error`)."""

    def __init__(self, max_attempts: int, backoff: float, repo_id: str):
        self.max_attempts = max(1, int(max_attempts))
        self.backoff = max(0.0, float(backoff))
        self.repo_id = repo_id

    def __call__(self, operation: Callable[[], T], what: str) -> T:
        return with_retries(
            operation,
            f"{what} for '{self.repo_id}'",
            attempts=self.max_attempts,
            backoff=self.backoff,
            on_error=lambda err, attempts: hub_error(err, self.repo_id, what, attempts),
        )


def hub_error(err: BaseException, repo_id: str, what: str, attempts: int = 1) -> WEMoEError:
    """A one-line `WEMoEError` for a failed Hub call: what failed, why, and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    tried = f" after {attempts} attempts" if attempts > 1 else ""
    nothing = "nothing was committed"
    if isinstance(err, WEMoEError):
        return err
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        detail = one_line(err.server_message or first_line(err))
        if status == 401:
            return WEMoEError(
                f"the Hub refused the token (401 Unauthorized) when trying to {what} for '{repo_id}'; log in with "
                "`hf auth login` or set HF_TOKEN to a valid token with write access"
            )
        if status == 403:
            return WEMoEError(
                f"no write access to '{repo_id}' (403 Forbidden): use a token with write access to "
                f"'{repo_id.split('/')[0]}'"
            )
        if isinstance(err, RevisionNotFoundError):
            return WEMoEError(f"branch not found in '{repo_id}' ({detail}); {nothing}")
        if isinstance(err, RepositoryNotFoundError):
            return WEMoEError(
                f"repo '{repo_id}' not found or not accessible with this token ({detail}); {nothing}"
            )
        if status == 409:
            return WEMoEError(f"cannot {what} '{repo_id}': {detail} (409 Conflict); {nothing}")
        return WEMoEError(f"push to '{repo_id}' failed{tried} trying to {what}: {status} {detail}; {nothing}")
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return WEMoEError(
            f"the Hub refused the model card metadata of '{repo_id}': {one_line(err)}; {nothing}"
        )
    if is_transient(err):
        return hub_unreachable(
            err,
            f"{what} for '{repo_id}'",
            attempts,
            advice=f"{nothing}; check the network and HF_ENDPOINT, or give slow connections more time with "
            f"HF_HUB_DOWNLOAD_TIMEOUT (now {hub_timeout():g} s)",
        )
    return WEMoEError(f"push to '{repo_id}' failed trying to {what}: {one_line(err)}; {nothing}")


def _delete_created_repo(api: Any, repo_id: str) -> None:
    """Remove a repo this push created, so a failed push leaves nothing behind (best effort)."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as err:  # noqa: BLE001
        logger.warning(
            "could not delete the empty repo %s created by the failed push: %s", repo_id, one_line(err)
        )


__all__ = [
    "ModelFolder",
    "PushResult",
    "check_repo_id",
    "check_token",
    "hub_error",
    "is_transient",
    "model_classes",
    "push_folder",
    "validate_model_folder",
]
