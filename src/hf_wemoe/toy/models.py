"""Tiny CLIP building blocks for the toy zoo: an offline tokenizer, configs, image processor, pixel tensors.

Nothing here downloads anything. The tokenizer is a byte-level BPE ``CLIPTokenizer`` whose vocabulary is
written from scratch: the 256 byte symbols (alone and with the ``</w>`` end-of-word suffix, so any text can be
encoded), one whole-word token per word of the toy captions (reached by a chain of merges), and the
``<|startoftext|>`` / ``<|endoftext|>`` special tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPProcessor, CLIPTokenizer

try:  # The PIL backend needs no torchvision; it saves the same preprocessor_config.json as the default one.
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # older transformers
    from transformers import CLIPImageProcessor as _ImageProcessor

from hf_wemoe.toy.tasks import IMAGE_SIZE, TASKS

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "ModelSizes",
    "build_clip_config",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "byte_symbols",
    "caption_words",
    "to_pixel_values",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Per-channel normalisation of the toy image processor (close to the toy images' statistics).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class ModelSizes:
    """Architecture of the tiny CLIP (vision and text towers)."""

    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    patch_size: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_text_length: int = 32
    projection_dim: int = 64

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form for the manifest."""
        return asdict(self)


def caption_words(extra: Iterable[str] = ()) -> list[str]:
    """Every lower-case word that occurs in a toy task's templates or class names (sorted), plus ``extra``."""
    words: set[str] = set()
    texts = list(extra)
    for task in TASKS.values():
        texts.extend(task.templates)
        texts.extend(task.classnames)
    for text in texts:
        words.update(w.lower() for w in _WORD.findall(text.replace("{c}", " ")))
    return sorted(words)


def build_tokenizer(words: Sequence[str] | None = None, model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer built offline, with whole-word tokens for ``words``.

    Any text can be encoded (the 256 byte symbols are in the vocabulary); words of the toy captions become
    single tokens. Ids are assigned in a fixed order, so the tokenizer files are identical on every build.
    """
    words = caption_words() if words is None else sorted(set(words))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add_chain(pieces: list[str]) -> None:
        # Merge pieces left to right; every intermediate string becomes a vocabulary entry.
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            current = current + nxt
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(current, len(vocab))

    for word in words:
        # Byte-level symbols of the word, the last one carrying the end-of-word suffix.
        symbols = [_BYTE_TO_SYMBOL[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        add_chain(symbols)
    # Chains of different words can interfere (an earlier merge splits a later word differently). Appending a
    # chain over a word's actual pieces finishes it without touching words that are already single tokens.
    for _ in range(8):
        tokenizer = _make_tokenizer(vocab, merges, model_max_length)
        split = {w: tokenizer.tokenize(w) for w in words}
        unfinished = [w for w in words if len(split[w]) != 1]
        if not unfinished:
            return tokenizer
        for word in unfinished:
            add_chain(split[word])
    raise RuntimeError("toy tokenizer: could not make every caption word a single token")


def _make_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int
) -> CLIPTokenizer:
    full = dict(vocab)
    full[BOS_TOKEN] = len(full)
    full[EOS_TOKEN] = len(full)
    return CLIPTokenizer(vocab=full, merges=list(merges), model_max_length=model_max_length)


def byte_symbols() -> dict[int, str]:
    """The byte -> printable-symbol table of byte-level BPE (the one the ``ByteLevel`` pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_SYMBOL = byte_symbols()


def build_clip_config(tokenizer: CLIPTokenizer, sizes: ModelSizes) -> CLIPConfig:
    """The ``CLIPConfig`` of the toy base model (32x32 images)."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    bos = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "max_position_embeddings": sizes.max_text_length,
        "projection_dim": sizes.projection_dim,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    vision_config = {
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_intermediate,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "image_size": IMAGE_SIZE,
        "patch_size": sizes.patch_size,
        "projection_dim": sizes.projection_dim,
    }
    return CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=sizes.projection_dim
    )


def build_image_processor() -> _ImageProcessor:
    """The 32x32 CLIP image processor shared by the base model and every expert."""
    return _ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """A ``CLIPProcessor`` (image processor + tokenizer) for the base model folder."""
    return CLIPProcessor(image_processor=build_image_processor(), tokenizer=tokenizer)


def to_pixel_values(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Normalised pixel tensor (N, 3, 32, 32) from uint8 32x32 RGB arrays.

    Equals what the toy image processor produces for 32x32 images (resize and crop are the identity there),
    without the per-image Python overhead.
    """
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
