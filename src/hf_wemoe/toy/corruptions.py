"""Corrupted test splits of the toy zoo: the robustness protocol's seven corruptions, offline.

The papers' robustness experiment adapts and evaluates on corrupted test splits that the Hub datasets provide
(`tanganke/eurosat#impulse_noise`, ...; corruptions after Hendrycks & Dietterich, ICLR 2019). This module makes
the same seven kinds for the 32x32 toy images, with numpy and Pillow only, named exactly like the Hub's splits:

=====================  ============================================================  =====================
kind                   what it does                                                  level at severity 1..5
=====================  ============================================================  =====================
``gaussian_noise``     adds N(0, sigma) to every value (pixels scaled to [0, 1])     sigma .04 .06 .08 .09 .10
``impulse_noise``      sets a fraction of the values to 0 or 255 (salt and pepper)   fraction .01 .02 .03 .05 .07
``contrast``           pulls every pixel towards the image's per-channel mean        factor .75 .5 .4 .3 .15
``pixelate``           box-downsamples to a fraction of the side, blocks back up     fraction .6 .5 .4 .3 .25
``jpeg_compression``   a JPEG round trip                                             quality 80 65 58 50 40
``motion_blur``        averages copies shifted along a random direction (+-45 deg)   length (px) 3 4 5 6 7
``spatter``            smooth random blobs: water (blurred, bluish) or, at 4-5, mud  area .10 .15 .20 .25 .30
=====================  ============================================================  =====================

The noise, contrast and JPEG levels are CIFAR-10-C's (images of the same 32x32 size), pixelate's ImageNet-C's
fractions (at 32 pixels CIFAR's barely change an image); motion blur and spatter are simplified re-creations.
:data:`DEFAULT_SEVERITY` (3, the middle level) is what the toy robustness protocol uses.

Every corruption is a pure function of the image, the kind, the severity and a seeded generator: the same zoo
gives the same corrupted pixels on every run. :func:`get_corrupted_test_sets` writes them, once, as
``datasets`` folders next to the zoo (its own folders stay unchanged), one per task with one split per kind.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from hf_wemoe.errors import WEMoEError
from hf_wemoe.io.outputs import atomic_output_dir
from hf_wemoe.utils.progress import progress_bar

if TYPE_CHECKING:
    from hf_wemoe.toy.manifest import ZooManifest

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_VERSION",
    "DEFAULT_SEVERITY",
    "LEVELS",
    "check_corruption",
    "corrupt",
    "corrupted_dir",
    "get_corrupted_test_sets",
]

#: The seven corruptions, named like the corrupted splits of the Hub's datasets.
CORRUPTIONS = (
    "motion_blur",
    "impulse_noise",
    "gaussian_noise",
    "pixelate",
    "spatter",
    "contrast",
    "jpeg_compression",
)
#: Severity the toy robustness protocol uses (1..5).
DEFAULT_SEVERITY = 3
#: Bumped whenever a change here changes the corrupted pixels; cached splits of older versions are rebuilt.
CORRUPTION_VERSION = "1"
#: Each kind's level at severity 1..5 (see the module docstring for what each number means).
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "motion_blur": (3, 4, 5, 6, 7),
    "spatter": (0.10, 0.15, 0.20, 0.25, 0.30),
}
_WATER = np.array([0.25, 0.45, 0.75], dtype=np.float32)
_MUD = np.array([0.35, 0.25, 0.12], dtype=np.float32)


def check_corruption(kind: str, severity: int = DEFAULT_SEVERITY) -> None:
    """Raise `WEMoEError` for an unknown kind or a severity outside 1..5."""
    if kind not in LEVELS:
        raise WEMoEError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise WEMoEError(f"corruption severity must be 1..5, got {severity}")


def corrupt(
    image: np.ndarray, kind: str, severity: int = DEFAULT_SEVERITY, rng: np.random.Generator | None = None
) -> np.ndarray:
    """One image (uint8, (H, W, 3)) corrupted by `kind` at `severity`; `rng` draws the random parts (noise,
    blur direction, spatter), so a seeded generator gives the same pixels every time."""
    check_corruption(kind, severity)
    rng = rng if rng is not None else np.random.default_rng(0)
    level = LEVELS[kind][severity - 1]
    x = image.astype(np.float32) / 255.0
    if kind == "gaussian_noise":
        x = x + rng.normal(0.0, level, size=x.shape).astype(np.float32)
    elif kind == "impulse_noise":
        hit = rng.random(x.shape) < level
        x = np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float32), x)
    elif kind == "contrast":
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * level + mean
    elif kind == "pixelate":
        side = max(1, round(image.shape[1] * level)), max(1, round(image.shape[0] * level))
        small = Image.fromarray(image).resize(side, Image.Resampling.BOX)
        return np.asarray(small.resize(image.shape[1::-1], Image.Resampling.NEAREST), dtype=np.uint8).copy()
    elif kind == "jpeg_compression":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(level))
        return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8).copy()
    elif kind == "motion_blur":
        x = _motion_blur(x, int(level), math.radians(rng.uniform(-45.0, 45.0)))
    else:
        x = _spatter(image, x, level, mud=severity >= 4, rng=rng)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _motion_blur(x: np.ndarray, length: int, angle: float) -> np.ndarray:
    """The mean of `length` copies shifted by 0..length-1 pixels along `angle` (one-sided, like a camera that
    moved during the exposure); edges are extended, sub-pixel shifts interpolated bilinearly."""
    pad = length
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = x.shape[:2]
    total = np.zeros_like(x)
    for step in range(length):
        dx, dy = step * math.cos(angle), step * math.sin(angle)
        # Bilinear sampling at (row + dy, column + dx) of the padded image.
        rows = np.arange(height, dtype=np.float32)[:, None] + pad + dy
        cols = np.arange(width, dtype=np.float32)[None, :] + pad + dx
        r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
        fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
        total += (
            padded[r0, c0] * (1 - fr) * (1 - fc)
            + padded[r0 + 1, c0] * fr * (1 - fc)
            + padded[r0, c0 + 1] * (1 - fr) * fc
            + padded[r0 + 1, c0 + 1] * fr * fc
        )
    return total / length


def _spatter(
    image: np.ndarray, x: np.ndarray, area: float, mud: bool, rng: np.random.Generator
) -> np.ndarray:
    """Blobs covering about `area` of the image: the top quantile of a smoothed random field, edges softened.
    Water blurs and tints what is under it; mud covers it with a dark brown."""
    height, width = image.shape[:2]
    noise = Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8), mode="L")
    field = np.asarray(noise.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float32)
    mask = (field >= np.quantile(field, 1.0 - area)).astype(np.float32)
    soft = Image.fromarray((mask * 255).astype(np.uint8), mode="L").filter(ImageFilter.GaussianBlur(0.7))
    alpha = (np.asarray(soft, dtype=np.float32) / 255.0)[..., None]
    if mud:
        cover = np.broadcast_to(_MUD, x.shape)
        return (1 - 0.85 * alpha) * x + 0.85 * alpha * cover
    blurred = (
        np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32) / 255.0
    )
    cover = 0.5 * blurred + 0.5 * _WATER
    return (1 - 0.8 * alpha) * x + 0.8 * alpha * cover


def corrupted_dir(zoo: ZooManifest, severity: int = DEFAULT_SEVERITY) -> Path:
    """Where the corrupted test splits of `zoo` are kept: a folder beside the zoo's, named after it, the
    corruption recipe version and the severity (the zoo's own folder is never written to)."""
    return zoo.root.parent / f"{zoo.root.name}-corrupted-{CORRUPTION_VERSION}-s{severity}"


def get_corrupted_test_sets(
    zoo: ZooManifest,
    tasks: Sequence[str] | None = None,
    severity: int = DEFAULT_SEVERITY,
    progress: bool | None = None,
) -> dict[str, Path]:
    """`{task: folder}` of the corrupted test splits of `tasks` (default: all of the zoo's): each folder is a
    `DatasetDict` with one split per kind of :data:`CORRUPTIONS`, every image of the zoo's test split corrupted
    at `severity`. Folders are built on first use (a few seconds per task) and reused after."""
    check_corruption(CORRUPTIONS[0], severity)
    tasks = list(zoo.tasks if tasks is None else tasks)
    unknown = [task for task in tasks if task not in zoo.tasks]
    if unknown:
        raise WEMoEError(f"unknown toy task(s) {unknown}; the zoo has {', '.join(zoo.tasks)}")
    root = corrupted_dir(zoo, severity)
    folders = {}
    for task in tasks:
        folder = root / task
        if not (folder / "dataset_dict.json").is_file():
            _write_corrupted(zoo, task, severity, folder, progress)
        folders[task] = folder
    record = root / "corruptions.json"
    if not record.is_file():
        record.write_text(
            json.dumps(
                {
                    "version": CORRUPTION_VERSION,
                    "severity": severity,
                    "levels": LEVELS,
                    "zoo": str(zoo.root),
                    "preset": zoo.preset,
                    "seed": zoo.seed,
                },
                indent=2,
            )
            + "\n"
        )
    return folders


def _write_corrupted(zoo: ZooManifest, task: str, severity: int, folder: Path, progress: bool | None) -> None:
    import datasets

    test = datasets.load_from_disk(str(zoo.dataset_path(task)))["test"]
    images = [np.asarray(item.convert("RGB"), dtype=np.uint8) for item in test["image"]]
    labels = list(test["label"])
    splits = {}
    with progress_bar(total=len(CORRUPTIONS) * len(images), desc=f"corrupting {task}", show=progress) as bar:
        for index, kind in enumerate(CORRUPTIONS):
            # One stream per (zoo seed, task, kind, severity): independent of which other tasks are built.
            rng = np.random.default_rng(
                np.random.SeedSequence([zoo.seed, zoo.tasks.index(task), index, severity])
            )
            corrupted = []
            for image in images:
                corrupted.append(Image.fromarray(corrupt(image, kind, severity, rng)))
                bar.update(1)
            splits[kind] = datasets.Dataset.from_dict(
                {"image": corrupted, "label": labels}, features=test.features, info=test.info
            )
    with atomic_output_dir(folder, overwrite=True) as staging:
        datasets.DatasetDict(splits).save_to_disk(str(staging))
