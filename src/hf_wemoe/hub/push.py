"""The push workflow behind `hf-wemoe push` and `--push-to-hub`: a model folder to a Hub repo in one commit.

Before anything is sent, the folder is proven to be a working model: it is loaded once with the class its config
names (WEMoE vision tower, full WEMoE CLIP, or a plain CLIP (vision) model), every weight must match the model,
one forward pass must run, and the files that remote code, pipelines and widgets need must be there. The model
card is rendered for the repo id. Then the repo is created when missing and the whole folder goes up with a single
`HfApi.upload_folder` commit, which also deletes files of an earlier push that the folder no longer has: the
repo shows either the previous commit or the new one, never a mix.

Transient failures (HTTP 408/429/5xx, connection errors) are retried with exponential backoff on the calls
huggingface_hub does not retry itself; other failures are reported as one line. A repo created by a push that then
fails is deleted again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hf_wemoe.errors import WEMoEError
from hf_wemoe.utils.formatting import format_size

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
PREPROCESSOR_NAME = "preprocessor_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# Never uploaded: hidden files, caches, leftovers of interrupted writes.
IGNORE_PATTERNS = [".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "*.pyc", "*.tmp-*", "*.partial"]
# Status codes worth retrying: timeout, rate limit, server errors.
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    tensor; one forward pass runs; WEMoE folders carry the code files their `auto_map` names; full CLIP models
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
        raise WEMoEError(f"'{folder}/{CONFIG_NAME}' is not valid JSON: {_one_line(err)}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    classes = _model_classes()
    if model_type not in classes:
        raise WEMoEError(
            f"'{folder}' holds a {model_type!r} model; hf-wemoe push uploads WEMoE models and CLIP (vision) models "
            "merged by hf-wemoe"
        )
    model_class, is_wemoe, full_clip = classes[model_type]
    info = ModelFolder(path, model_type, model_class.__name__, is_wemoe, full_clip)
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
            f"'{folder}/{CONFIG_NAME}' is not a valid {model_type} config: {_one_line(err)}"
        ) from err
    # The weights are checked against the model's own tensors first (a model on the meta device costs nothing):
    # transformers would fill missing ones with random values and only warn.
    with torch.device("meta"):
        skeleton = model_class(config_object)
    _check_weights(path, skeleton)
    try:
        with _quiet_transformers():
            model = model_class.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 -- any load failure means the folder is broken
        raise WEMoEError(f"'{folder}' does not load as a {model_class.__name__}: {_one_line(err)}") from err
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
        raise WEMoEError(f"the model in '{folder}' loads but does not run: {_one_line(err)}") from err
    info.files = _files_to_upload(path)
    return info


def _model_classes() -> dict[str, tuple[Any, bool, bool]]:
    """config.json model_type -> (model class, is WEMoE, is a full CLIP model)."""
    from transformers import CLIPModel, CLIPVisionModel

    from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
    from hf_wemoe.models.modeling_wemoe_clip import WEMoECLIPModel

    return {
        "wemoe_clip_vision_model": (WEMoECLIPVisionModel, True, False),
        "wemoe_clip": (WEMoECLIPModel, True, True),
        "clip_vision_model": (CLIPVisionModel, False, False),
        "clip": (CLIPModel, False, True),
    }


def _check_code_files(path: Path, config: dict[str, Any]) -> None:
    """`trust_remote_code` loads the files `auto_map` names: they must be in the folder, with their siblings."""
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map or "AutoConfig" not in auto_map:
        raise WEMoEError(
            f"'{path}/{CONFIG_NAME}' has no auto_map for AutoConfig and AutoModel, so trust_remote_code cannot "
            "load it; re-save the model with save_pretrained"
        )
    modules = {str(entry).rsplit(".", 1)[0] for entry in auto_map.values() if isinstance(entry, str)}
    needed = sorted(modules | {"configuration_wemoe", "modeling_wemoe"})
    missing = [f"{name}.py" for name in needed if not (path / f"{name}.py").is_file()]
    if missing:
        raise WEMoEError(
            f"'{path}' lacks the model code file {missing[0]} that trust_remote_code loads; re-save the model "
            "with save_pretrained"
        )


def _check_weights(path: Path, model: Any) -> None:
    """Every tensor of the model is in the weight files with its shape, and the files hold nothing else."""
    from hf_wemoe.io.weights import tensor_shapes

    try:
        stored = {key: shape for key, (shape, _) in tensor_shapes(path).items()}
    except Exception as err:  # noqa: BLE001 -- unreadable or corrupt safetensors files
        raise WEMoEError(f"the weights in '{path}' cannot be read: {_one_line(err)}") from err
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
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise WEMoEError(
            f"the tokenizer or image processor in '{path}' does not load: {_one_line(err)}"
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
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return list(filter_repo_objects(names, ignore_patterns=IGNORE_PATTERNS))


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
        show_progress: huggingface_hub's upload progress bars; by default only on a terminal.

    Raises:
        WEMoEError: malformed repo id, no token, a broken model folder, or a Hub error (one line). Nothing is
            committed then, and a repo this push created is deleted again.
    """
    import sys

    repo_id = check_repo_id(repo_id)
    token = check_token(token)
    if branch is not None and not str(branch).strip():
        raise WEMoEError("empty --branch; give a branch name or leave it out to push to main")
    model = validate_model_folder(folder)
    for warning in model.warnings:
        logger.warning(warning)
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    retry = _Retry(max_attempts, backoff, repo_id)
    with _upload_staging(model, repo_id, keep_card) as staging, _progress_bars(show_progress):
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
    symbolically linked; upload_folder reads through both.
    """
    from hf_wemoe.hub.cards import local_source_paths, model_card, validate_card

    staging = Path(tempfile.mkdtemp(prefix="hf-wemoe-push-"))
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
        local = local_source_paths(model.path)
        if local:
            logger.warning(
                "the model card names the sources by local paths (%s) and no Hub base model, so the paths are "
                "published and the Hub links the model to nothing; merge from Hub repo ids (org/name) to link them",
                ", ".join(local),
            )
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Retry:
    """Call a Hub operation, retrying transient failures with exponential backoff; other failures become one line."""

    def __init__(self, max_attempts: int, backoff: float, repo_id: str):
        self.max_attempts = max(1, int(max_attempts))
        self.backoff = max(0.0, float(backoff))
        self.repo_id = repo_id

    def __call__(self, operation: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.max_attempts + 1):
            try:
                return operation()
            except Exception as err:  # noqa: BLE001 -- classified below
                if not is_transient(err) or attempt == self.max_attempts:
                    raise hub_error(err, self.repo_id, what, attempt) from err
                wait = min(30.0, self.backoff * 2 ** (attempt - 1))
                logger.warning(
                    "%s: %s failed (%s); retrying in %.1fs (attempt %d of %d)",
                    self.repo_id,
                    what,
                    _one_line(err),
                    wait,
                    attempt + 1,
                    self.max_attempts,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: HTTP 408/429/5xx answers and connection-level errors."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        return getattr(response, "status_code", None) in TRANSIENT_STATUS
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover -- older huggingface_hub releases use httpx
        import httpx
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


def hub_error(err: BaseException, repo_id: str, what: str, attempts: int = 1) -> WEMoEError:
    """A one-line `WEMoEError` for a failed Hub call: what failed, why, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    tried = f" after {attempts} attempts" if attempts > 1 else ""
    nothing = "nothing was committed"
    if isinstance(err, WEMoEError):
        return err
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        detail = _one_line(err.server_message or str(err).splitlines()[0])
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
            f"the Hub refused the model card metadata of '{repo_id}': {_one_line(err)}; {nothing}"
        )
    if is_transient(err):
        return WEMoEError(
            f"cannot reach the Hub at {constants.ENDPOINT}{tried} trying to {what} for '{repo_id}': "
            f"{_one_line(err)}; {nothing}"
        )
    return WEMoEError(f"push to '{repo_id}' failed trying to {what}: {_one_line(err)}; {nothing}")


def _delete_created_repo(api: Any, repo_id: str) -> None:
    """Remove a repo this push created, so a failed push leaves nothing behind (best effort)."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as err:  # noqa: BLE001
        logger.warning(
            "could not delete the empty repo %s created by the failed push: %s", repo_id, _one_line(err)
        )


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Keep loading messages and progress bars of transformers out of the command's output."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


__all__ = [
    "ModelFolder",
    "PushResult",
    "check_repo_id",
    "check_token",
    "hub_error",
    "is_transient",
    "push_folder",
    "validate_model_folder",
]
