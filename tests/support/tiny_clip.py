"""A tiny, randomly initialised CLIP (text + vision towers, tokenizer, image processor) built offline.

``make_tiny_clip(path)`` writes a folder that ``CLIPModel.from_pretrained``, ``AutoTokenizer.from_pretrained``
and ``AutoImageProcessor.from_pretrained`` load like a Hub checkpoint. The same seed gives the same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from hf_wemoe.toy.models import byte_symbols

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# A few merges so the tokenizer is a real BPE (whole words for common template words), not characters only.
_MERGES = [
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
    ("o", "f</w>"),
    ("t", "h"),
    ("th", "e</w>"),
]


def write_tiny_clip_tokenizer(path: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for a tiny byte-level CLIP tokenizer into ``path`` and save it there.

    Every byte has a token with and without the ``</w>`` end-of-word suffix, so any text tokenizes without
    unknown tokens; the special tokens take the highest ids, as in OpenAI CLIP (so either pooling rule works).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(byte_symbols().values())  # byte-level BPE's printable symbol for each byte, in byte order
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair) for pair in _MERGES if "".join(pair) not in tokens]
    tokens += [BOS, EOS]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (path / "merges.txt").write_text(merges, encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_clip(
    path: str | Path,
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    projection_dim: int = 16,
    max_position_embeddings: int = 77,
) -> Path:
    """Save a tiny CLIPModel + CLIPTokenizer + CLIPImageProcessor (``image_size`` square) into ``path``.

    ``logit_scale`` is ln(100), as in the trained OpenAI checkpoints. Returns ``path``.
    """
    path = Path(path)
    tokenizer = write_tiny_clip_tokenizer(path, model_max_length=max_position_embeddings)
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max_position_embeddings,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(path)
    return path
