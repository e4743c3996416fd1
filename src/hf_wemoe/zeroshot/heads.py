"""CLIP zero-shot classification heads, and a disk cache for them.

For each class, every prompt template is filled with the class name and embedded by the pretrained CLIP text
tower plus ``text_projection``; the embeddings are L2-normalised, averaged over templates and normalised again,
giving a (num_classes, projection_dim) weight. Logits are ``exp(logit_scale) * normalise(image_embeds) @ W.T``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.io.hub import install_timeouts
from hf_wemoe.io.layout import CARD_NAME, CONFIG_NAME
from hf_wemoe.io.pretrained import load_config, load_model, locate_pretrained
from hf_wemoe.io.sources import ModelReference, parse_reference
from hf_wemoe.utils.formatting import first_line
from hf_wemoe.utils.progress import progress
from hf_wemoe.zeroshot.templates import fill_template, validate_templates

__all__ = [
    "ZeroShotHead",
    "build_zeroshot_head",
    "heads_cache_dir",
    "load_or_build_head",
    "load_or_build_heads",
    "model_identity",
]

_CACHE_FORMAT = "hf_wemoe.zeroshot_head.v1"
_SHA = re.compile(r"^[0-9a-f]{40}$")
# Files of a local model folder that do not change the text tower or the tokenizer: docs, and weights for
# other frameworks (transformers loads PyTorch weights, preferring safetensors over .bin).
_IGNORED_FILES = {CARD_NAME, ".gitattributes"}
_OTHER_FRAMEWORK_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot")


class ZeroShotHead(nn.Module):
    """A zero-shot classifier over CLIP image embeddings.

    ``weight`` (num_classes, dim) holds unit-norm class embeddings; ``logit_scale`` is CLIP's log-space
    temperature (ln 100 for OpenAI CLIP). Both are buffers: they move with ``.to()`` and never train.
    """

    weight: torch.Tensor
    logit_scale: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        logit_scale: torch.Tensor | float,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"head weight must be (num_classes, dim), got shape {tuple(weight.shape)}")
        if classnames is not None and len(classnames) != weight.shape[0]:
            raise ValueError(f"{len(classnames)} class names for a head with {weight.shape[0]} classes")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer(
            "logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone()
        )
        self.classnames = list(classnames) if classnames is not None else None
        self.templates = list(templates) if templates is not None else None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) for projected image embeddings (batch, dim); the embeddings are
        L2-normalised here."""
        image_embeds = F.normalize(image_embeds, dim=-1)
        weight = self.weight.to(dtype=image_embeds.dtype)
        return self.logit_scale.exp().to(image_embeds.dtype) * image_embeds @ weight.T

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write the head to a safetensors file (atomically: concurrent writers cannot leave a torn file)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": _CACHE_FORMAT, **(metadata or {})}
        if self.classnames is not None:
            meta["classnames"] = json.dumps(self.classnames)
        if self.templates is not None:
            meta["templates"] = json.dumps(self.templates)
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "logit_scale": self.logit_scale.cpu()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> ZeroShotHead:
        """Read a head written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, logit_scale = f.get_tensor("weight"), f.get_tensor("logit_scale")
        classnames = json.loads(meta["classnames"]) if "classnames" in meta else None
        templates = json.loads(meta["templates"]) if "templates" in meta else None
        return cls(weight, logit_scale, classnames=classnames, templates=templates)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def build_zeroshot_head(
    clip_model: Any,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> ZeroShotHead:
    """Build a zero-shot head from a CLIP model (``transformers.CLIPModel``: ``text_model``,
    ``text_projection`` and ``logit_scale``) and its tokenizer.

    Prompts are embedded ``batch_size`` at a time on ``device`` (default: the model's device); the head is
    returned on CPU in float32.
    """
    for attribute in ("text_model", "text_projection", "logit_scale"):
        if not hasattr(clip_model, attribute):
            raise WEMoEError(
                f"zero-shot heads need a full CLIP model with a text tower; {type(clip_model).__name__} has no "
                f"{attribute!r} (use the pretrained CLIP, e.g. openai/clip-vit-base-patch32)"
            )
    classnames = list(classnames)
    if not classnames:
        raise WEMoEError("no class names for the zero-shot head")
    templates = validate_templates(templates)
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    device = torch.device(device) if device is not None else _model_device(clip_model)
    max_length = getattr(getattr(clip_model.config, "text_config", None), "max_position_embeddings", None)

    was_training = clip_model.training
    original_device = _model_device(clip_model)
    clip_model.eval().to(device)
    try:
        chunks = range(0, len(prompts), batch_size)
        embeddings = []
        for start in progress(chunks, "zero-shot head", unit="batch", show=show_progress):
            tokens = tokenizer(
                prompts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            pooled = clip_model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
            ).pooler_output
            embeddings.append(F.normalize(clip_model.text_projection(pooled).float(), dim=-1).cpu())
        logit_scale = clip_model.logit_scale.detach().float().cpu()
    finally:
        clip_model.to(original_device).train(was_training)

    per_template = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    weight = F.normalize(per_template.mean(dim=1), dim=-1)
    return ZeroShotHead(weight, logit_scale, classnames=classnames, templates=templates)


# ---------------------------------------------------------------------------------------------------------
# cache


def heads_cache_dir() -> Path:
    """``$HF_WEMOE_CACHE/heads``, else ``$XDG_CACHE_HOME/hf_wemoe/heads``, else ``~/.cache/hf_wemoe/heads``."""
    root = os.environ.get("HF_WEMOE_CACHE")
    if root:
        return Path(root).expanduser() / "heads"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "hf_wemoe" / "heads"


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def _cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit that ``repo@revision`` points to in the local Hub cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, CONFIG_NAME, revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None  # .../snapshots/<sha>/config.json


def _resolve_hub_commit(repo: str, revision: str | None) -> str:
    """The commit sha of ``repo@revision``: asked of the Hub, else (offline, unreachable) read from the local
    Hub cache."""
    if revision is not None and _SHA.match(revision):
        return revision
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    reason = "offline mode"
    if not is_offline_mode():
        install_timeouts()
        try:
            sha = HfApi().model_info(repo, revision=revision).sha
            if sha:
                return sha
            reason = "no commit sha in the Hub's answer"
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise SourceError(
                f"unknown model {repo}@{revision or 'main'} on the Hub: {first_line(exc)}"
            ) from exc
        except Exception as exc:  # unreachable Hub: fall back to what the local cache knows
            reason = type(exc).__name__
    cached = _cached_commit(repo, revision)
    if cached is not None:
        return cached
    raise SourceError(
        f"cannot resolve the commit of {repo}@{revision or 'main'} ({reason}) and the model is not in the local "
        "Hub cache; connect once to download it, or pass a local folder"
    )


def model_identity(clip_ref_or_path: str | Path) -> str:
    """A string that changes whenever the model's text side may change: ``hub:<repo>@<commit sha>`` for a Hub
    model (``org/name[@revision]``), ``sha256:<digest>`` of the folder's files (PyTorch weights, config,
    tokenizer) for a local folder."""
    return _identity(parse_reference(str(clip_ref_or_path)))


def _identity(ref: ModelReference) -> str:
    if not ref.is_local:
        return f"hub:{ref.repo_id}@{_resolve_hub_commit(ref.repo_id, ref.revision)}"
    files = sorted(
        p
        for p in ref.path.iterdir()
        if p.is_file() and p.name not in _IGNORED_FILES and p.suffix not in _OTHER_FRAMEWORK_SUFFIXES
    )
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix != ".bin"]
    elif not any(p.suffix == ".bin" for p in files):
        raise SourceError(f"no model weights (*.safetensors, *.bin) in {ref.text}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_file_digest(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _cache_key(identity: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "model": identity,
            "classnames": list(classnames),
            "templates": list(templates),
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _load_clip(ref: ModelReference, allow_pickle: bool = False) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CLIPModel

    # Hub models load by the user's revision (not the resolved sha), so the Hub cache records where that
    # revision points and the commit can be resolved offline later.
    advice = "zero-shot heads need the full pretrained CLIP, e.g. openai/clip-vit-base-patch32"
    what = "a CLIP model with its text tower and tokenizer from"
    location = locate_pretrained(ref, allow_pickle=allow_pickle)
    config = load_config(location, what)
    # CLIPModel.from_pretrained would turn a vision-only config into a random full CLIP: check first.
    if config.model_type != "clip":
        raise SourceError(f"{ref.text} is a {config.model_type!r} model, not a full CLIP; {advice}")
    model = load_model(CLIPModel, location, what, config=config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.name_or_path, **location.load_kwargs())
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"cannot load {what} {ref.text}: {first_line(exc)} ({advice})") from exc
    return model, tokenizer


def load_or_build_heads(
    clip_ref_or_path: str | Path,
    tasks: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    cache_dir: str | Path | None = None,
    *,
    clip_model: Any = None,
    tokenizer: Any = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    show_progress: bool = False,
    allow_pickle: bool = False,
) -> dict[str, ZeroShotHead]:
    """Zero-shot heads for several tasks (``{task: (classnames, templates)}``), from the disk cache when
    possible; the CLIP model is loaded at most once, and only when some head is missing.

    ``clip_model``/``tokenizer``, when given, must be the model that ``clip_ref_or_path`` names; they save
    loading it again. Heads are keyed by the model identity (see :func:`model_identity`), the class names and
    the templates; ``cache_dir`` defaults to :func:`heads_cache_dir`. A model with only pickle weights is loaded
    only with ``allow_pickle``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else heads_cache_dir()
    ref = parse_reference(str(clip_ref_or_path))
    identity = _identity(ref)
    heads: dict[str, ZeroShotHead] = {}
    for task, (classnames, templates) in tasks.items():
        templates = validate_templates(templates, f"templates of task {task!r}")
        file = cache / f"{_cache_key(identity, classnames, templates)}.safetensors"
        if file.is_file():
            try:
                head = ZeroShotHead.load(file)
            except Exception:  # a damaged cache entry is rebuilt, not fatal
                head = None
            if head is not None and head.classnames == list(classnames):
                heads[task] = head
                continue
        if clip_model is None:
            clip_model, tokenizer = _load_clip(ref, allow_pickle)
            if not ref.is_local:
                # Key by the commit actually loaded, should the revision have moved since it was resolved.
                commit = _cached_commit(ref.repo_id, ref.revision) or identity.rsplit("@", 1)[1]
                identity = f"hub:{ref.repo_id}@{commit}"
                file = cache / f"{_cache_key(identity, classnames, templates)}.safetensors"
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with clip_model")
        head = build_zeroshot_head(
            clip_model, tokenizer, classnames, templates, batch_size, device, show_progress=show_progress
        )
        head.save(file, metadata={"model": identity, "task": task})
        heads[task] = head
    return heads


def load_or_build_head(
    clip_ref_or_path: str | Path,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> ZeroShotHead:
    """One zero-shot head, from the disk cache when possible (see :func:`load_or_build_heads`)."""
    heads = load_or_build_heads(clip_ref_or_path, {"head": (classnames, templates)}, cache_dir, **kwargs)
    return heads["head"]
