"""Full CLIP outputs (`hf-wemoe merge --full-clip`): the merged vision tower plus the base's text tower.

A merge method writes a vision tower; `write_full_clip` turns that folder into a full CLIP model folder: the
pretrained model's text tower, `text_projection`, `visual_projection` and `logit_scale` with the merged vision
tower (a `WEMoECLIPModel` for WEMoE methods, a plain `CLIPModel` for static merges), its tokenizer files and its
image processor, so `pipeline("zero-shot-image-classification")` works on the result. It also reads what the
base's model card says about its license, which merged models inherit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.io.layout import CARD_NAME, CONFIG_NAME, PICKLE_NAME, TOKENIZER_CONFIG_NAME, TOKENIZER_FILES
from hf_wemoe.io.sources import CONFIG_METADATA_FIELDS, ModelSource, SafetensorsFile
from hf_wemoe.utils.formatting import one_line

_TEXT_PREFIXES = ("text_model.", "text_projection.", "visual_projection.")

logger = logging.getLogger(__name__)


def check_full_clip_base(base: ModelSource) -> None:
    """Refuse a base without a text tower: a full CLIP output needs the pretrained CLIP model, not a vision tower."""
    if base.layout != "clip":
        raise WEMoEError(
            f"--full-clip needs a full CLIP base model with its text tower (e.g. openai/clip-vit-base-patch32); "
            f"'{base.reference.text}' is a CLIP vision model"
        )


def base_files(base: ModelSource, names: tuple[str, ...]) -> dict[str, Path]:
    """Local paths of the files among `names` that the base checkpoint has (downloaded at the commit that was
    read, for Hub references)."""
    if base.reference.is_local:
        return {name: base.folder / name for name in names if (base.folder / name).is_file()}
    from huggingface_hub import HfApi, hf_hub_download

    repo_id, commit = base.reference.repo_id, base.commit
    try:
        available = {
            sibling.rfilename for sibling in HfApi().model_info(repo_id, revision=commit).siblings or []
        }
        return {
            name: Path(hf_hub_download(repo_id, name, revision=commit)) for name in names if name in available
        }
    except Exception as err:  # noqa: BLE001 -- network and HTTP failures become one readable line
        raise SourceError(f"cannot download files of '{base.reference.text}': {one_line(err)}") from err


def base_license(base: ModelSource) -> dict[str, str]:
    """`license` (and `license_name` / `license_link`) from the base's model card metadata; empty when unknown.

    Best effort: a missing or unreadable card, or a failed download, only means the license is unknown.
    """
    from huggingface_hub import ModelCard

    try:
        path = base_files(base, (CARD_NAME,)).get(CARD_NAME)
        if path is None:
            return {}
        data = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # noqa: BLE001
        logger.debug("no license read from the card of %s: %s", base.reference.text, err)
        return {}
    return {key: str(data[key]) for key in ("license", "license_name", "license_link") if data.get(key)}


def _text_tensors(base: ModelSource) -> dict[str, torch.Tensor]:
    """The text tower, both projections and `logit_scale` of a full CLIP checkpoint, under CLIPModel keys."""
    tensors: dict[str, torch.Tensor] = {}
    for path in base.weight_files:
        if path.name.endswith(".safetensors"):
            handle = SafetensorsFile(path)
            for key in handle.shapes:
                if key.startswith(_TEXT_PREFIXES) or key == "logit_scale":
                    tensors[key] = handle.get(key)
        elif path.name.startswith(PICKLE_NAME.removesuffix(".bin")):
            state = torch.load(path, map_location="cpu", weights_only=True)
            tensors.update(
                {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES) or k == "logit_scale"}
            )
    return tensors


def write_full_clip(vision_folder: Path, base: ModelSource, folder: Path, max_shard_size: int | str) -> None:
    """Write a full CLIP model into `folder` from the merged vision tower in `vision_folder` and the base.

    The vision tower is loaded once; the text tower is read from the base's weights. The result is built on the
    meta device with the real towers put in place, so memory holds one copy of the model.

    Raises:
        WEMoEError: the base lacks text tower tensors or tokenizer files.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionModel

    from hf_wemoe.models.configuration_wemoe import WEMoECLIPConfig
    from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
    from hf_wemoe.models.modeling_wemoe_clip import WEMoECLIPModel

    check_full_clip_base(base)
    base_config = json.loads((base.folder / CONFIG_NAME).read_text())
    tensors = _text_tensors(base)
    missing = [name for name in ("text_projection.weight", "visual_projection.weight") if name not in tensors]
    if missing or not any(key.startswith("text_model.") for key in tensors):
        raise WEMoEError(
            f"'{base.reference.text}' has no {missing[0] if missing else 'text tower'} in its weights; --full-clip "
            "needs the full pretrained CLIP checkpoint"
        )
    tokenizer = base_files(base, TOKENIZER_FILES)
    if TOKENIZER_CONFIG_NAME not in tokenizer or not ({"tokenizer.json", "vocab.json"} & set(tokenizer)):
        raise WEMoEError(
            f"'{base.reference.text}' has no tokenizer files (tokenizer_config.json with tokenizer.json or "
            "vocab.json); --full-clip saves the base's tokenizer with the model"
        )

    vision_type = json.loads((vision_folder / CONFIG_NAME).read_text()).get("model_type")
    is_wemoe = vision_type == WEMoECLIPVisionModel.config_class.model_type
    vision = (WEMoECLIPVisionModel if is_wemoe else CLIPVisionModel).from_pretrained(vision_folder).eval()
    text_values = {
        k: v for k, v in (base_config.get("text_config") or {}).items() if k not in CONFIG_METADATA_FIELDS
    }
    text_config = CLIPTextConfig(**text_values)
    config_class, model_class = (WEMoECLIPConfig, WEMoECLIPModel) if is_wemoe else (CLIPConfig, CLIPModel)
    vision_values = vision.config.to_dict()
    vision_values.pop("_name_or_path", None)  # the temporary folder: not part of the model
    config = config_class(
        text_config=text_config.to_dict(),
        vision_config=vision_values,
        projection_dim=tensors["text_projection.weight"].shape[0],
        logit_scale_init_value=float(
            base_config.get("logit_scale_init_value", tensors.get("logit_scale", torch.tensor(2.6592)))
        ),
    )
    with torch.device("meta"):
        model = model_class(config)
    text_model = CLIPTextModel(text_config)
    text_model.load_state_dict(_strip(tensors, "text_model."), strict=False)
    _check_loaded(text_model, _strip(tensors, "text_model."), base)
    model.text_model = text_model.to(vision.dtype)
    model.vision_model = vision
    for name in ("text_projection", "visual_projection"):
        weight = tensors[f"{name}.weight"]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = nn.Parameter(weight.to(vision.dtype))
        setattr(model, name, layer)
    logit_scale = tensors.get("logit_scale", torch.tensor(config.logit_scale_init_value))
    model.logit_scale = nn.Parameter(logit_scale.to(vision.dtype))
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:  # a bug, not bad input: every part of the model must come from a checkpoint
        raise RuntimeError(f"full CLIP assembly left tensors unset: {left[:3]}")
    if is_wemoe:
        model.freeze_non_router_parameters()
    model.eval().save_pretrained(folder, max_shard_size=max_shard_size)
    for name, path in tokenizer.items():
        shutil.copyfile(path, folder / name)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _check_loaded(module: nn.Module, state: dict[str, torch.Tensor], base: ModelSource) -> None:
    """Every persistent tensor of `module` must come from the checkpoint (buffers such as position ids may not)."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state) - {"embeddings.position_ids"})
    if missing:
        raise WEMoEError(
            f"'{base.reference.text}' text tower lacks tensor 'text_model.{missing[0]}' ({len(missing)} missing); "
            "is its config.json the checkpoint's?"
        )


__all__ = ["base_license", "check_full_clip_base", "write_full_clip"]
