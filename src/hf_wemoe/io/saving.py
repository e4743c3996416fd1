"""Saving a model built in Python so that it works like a folder written by `hf-wemoe merge`.

`model.save_pretrained(folder)` writes the config, the weights and the model code, but no image processor, and
`pipeline(...)` needs one. `save_model` writes the model together with the processor of the pretrained CLIP (and,
for a full CLIP model, its tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_wemoe.errors import WEMoEError
from hf_wemoe.io.pretrained import locate_pretrained
from hf_wemoe.utils.formatting import first_line


def save_model(
    model: Any, save_directory: str | Path, processor: Any = None, **save_kwargs: Any
) -> Path:
    """Save `model` with `save_pretrained` and its processor beside it, so that pipelines and the Hub widgets work.

    Args:
        model: a WEMoE model (or any transformers model) to save.
        save_directory: the folder to write.
        processor: an image processor or processor object (anything with `save_pretrained`), or the Hub id or
            local folder of the pretrained CLIP to load it from. Default: the base recorded in the model's config
            (`base_model_ref`, set by `build_wemoe(..., base_model_ref=...)` and by `hf-wemoe merge`). A model
            with a text tower (`WEMoECLIPModel`) gets the full processor (image processor and tokenizer).
        **save_kwargs: passed on to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        The folder.

    Raises:
        WEMoEError: no processor given and none recorded, or one that cannot be loaded.
    """
    folder = Path(save_directory)
    if processor is None:
        config = getattr(model, "config", None)
        vision_config = getattr(config, "vision_config", None) or config
        processor = getattr(vision_config, "base_model_ref", None)
        if not processor:
            raise WEMoEError(
                "the model records no base model to take the image processor from; pass processor= (e.g. "
                "processor='openai/clip-vit-base-patch32' or a CLIPImageProcessor)"
            )
    if isinstance(processor, (str, Path)):
        processor = _load_processor(str(processor), full=hasattr(getattr(model, "config", None), "text_config"))
    model.save_pretrained(folder, **save_kwargs)
    processor.save_pretrained(folder)
    return folder


def _load_processor(reference: str, full: bool) -> Any:
    """The image processor (or, with `full`, the processor with the tokenizer) of a CLIP model reference."""
    from transformers import AutoImageProcessor, AutoProcessor

    # Resolved like every other model reference: a missing folder or an unreachable Hub is one line at once.
    location = locate_pretrained(reference, need_weights=False)
    loader = AutoProcessor if full else AutoImageProcessor
    try:
        return loader.from_pretrained(location.name_or_path, **location.load_kwargs())
    except (OSError, ValueError) as err:
        raise WEMoEError(f"cannot load the processor of {reference}: {first_line(err)}") from err


__all__ = ["save_model"]
