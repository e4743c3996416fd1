"""The toy zoo's corrupted test splits: each kind does what its name says, deterministically, and the splits are
built beside the zoo (named like the Hub's) without touching the zoo's own folders."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from hf_wemoe.errors import WEMoEError
from hf_wemoe.toy.corruptions import (
    CORRUPTIONS,
    DEFAULT_SEVERITY,
    LEVELS,
    corrupt,
    corrupted_dir,
    get_corrupted_test_sets,
)
from hf_wemoe.toy.tasks import generate_split

IMAGES = [image for task in ("shapes", "arrows", "textures") for image in generate_split(task, "test", 4, seed=0)[0]]


def corrupted(kind: str, seed: int = 0, severity: int = DEFAULT_SEVERITY) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [corrupt(image, kind, severity, rng) for image in IMAGES]


def high_frequency(image: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels: what blur removes."""
    x = image.astype(np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def test_the_seven_kinds_are_named_like_the_hub_splits():
    assert CORRUPTIONS == (
        "motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast", "jpeg_compression",
    )  # fmt: skip
    assert set(LEVELS) == set(CORRUPTIONS) and all(len(levels) == 5 for levels in LEVELS.values())


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_kind_is_deterministic_and_changes_the_image(kind):
    first, again = corrupted(kind), corrupted(kind)
    for image, out, same in zip(IMAGES, first, again):
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.array_equal(out, same)
        assert not np.array_equal(out, image)
    if kind in ("gaussian_noise", "impulse_noise", "motion_blur", "spatter"):  # the kinds that draw at random
        assert any(not np.array_equal(a, b) for a, b in zip(first, corrupted(kind, seed=1)))


def test_noise_kinds_add_the_documented_amount():
    level = LEVELS["gaussian_noise"][DEFAULT_SEVERITY - 1]
    diffs = np.concatenate([(o.astype(float) - i).ravel() for i, o in zip(IMAGES, corrupted("gaussian_noise"))])
    # Clipping at 0 and 255 only shrinks it: the spread is near sigma * 255 and the mean near zero.
    assert 0.8 * level * 255 < diffs.std() < 1.05 * level * 255 and abs(diffs.mean()) < 2
    fraction = LEVELS["impulse_noise"][DEFAULT_SEVERITY - 1]
    changed = salted = 0
    for image, out in zip(IMAGES, corrupted("impulse_noise")):
        hit = out != image
        changed += hit.sum()
        salted += np.isin(out[hit], (0, 255)).sum()
    assert salted == changed  # every changed value is black or white
    assert 0.5 * fraction < changed / sum(image.size for image in IMAGES) < 1.1 * fraction


def test_contrast_lowers_the_spread_and_keeps_the_mean():
    factor = LEVELS["contrast"][DEFAULT_SEVERITY - 1]
    for image, out in zip(IMAGES, corrupted("contrast")):
        # Per channel: each channel is pulled towards its own mean.
        for channel in range(3):
            old, new = image[..., channel].astype(float), out[..., channel].astype(float)
            assert new.std() == pytest.approx(factor * old.std(), rel=0.05, abs=0.5)
            assert new.mean() == pytest.approx(old.mean(), abs=1.0)


def test_pixelate_is_blocky():
    side = round(32 * LEVELS["pixelate"][DEFAULT_SEVERITY - 1])
    for out in corrupted("pixelate"):
        # At most `side` distinct rows and columns: blocks of equal pixels.
        assert len(np.unique(out, axis=0)) <= side and np.unique(out, axis=1).shape[1] <= side


def test_jpeg_differs_but_stays_close():
    correlations = []
    for image, out in zip(IMAGES, corrupted("jpeg_compression")):
        assert np.abs(out.astype(float) - image).mean() > 0
        correlations.append(np.corrcoef(image.ravel(), out.ravel())[0, 1])
    # Fine two-colour textures lose the most (JPEG halves the colour resolution); most images stay very close.
    assert min(correlations) > 0.6 and np.median(correlations) > 0.9


def test_motion_blur_removes_fine_detail():
    for image, out in zip(IMAGES, corrupted("motion_blur")):
        assert high_frequency(out) < 0.8 * high_frequency(image)
        assert out.mean() == pytest.approx(image.mean(), abs=6.0)


def test_spatter_covers_part_of_the_image():
    area = LEVELS["spatter"][DEFAULT_SEVERITY - 1]
    for image, out in zip(IMAGES, corrupted("spatter")):
        touched = (np.abs(out.astype(float) - image).max(axis=-1) > 0).mean()
        assert 0.5 * area < touched < 3 * area  # the blobs and their softened edges, not the whole image
    # Mud (severities 4 and 5) is dark and opaque.
    for image, out in zip(IMAGES, corrupted("spatter", severity=5)):
        covered = np.abs(out.astype(float) - image).max(axis=-1) > 40
        assert covered.any() and out[covered].mean() < 110


def test_bad_kind_or_severity_is_an_error():
    with pytest.raises(WEMoEError, match="unknown corruption 'fog'"):
        corrupt(IMAGES[0], "fog")
    with pytest.raises(WEMoEError, match="severity must be 1..5"):
        corrupt(IMAGES[0], "contrast", severity=6)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_corrupted_splits_are_built_beside_the_zoo_deterministically(toy_zoo_small):
    zoo = toy_zoo_small
    before = _hashes(zoo.root)
    severity = 2  # a folder of its own: other tests use the default severity's
    folders = get_corrupted_test_sets(zoo, ["dots"], severity=severity, progress=False)
    assert folders == {"dots": corrupted_dir(zoo, severity) / "dots"}
    assert corrupted_dir(zoo, severity).parent == zoo.root.parent
    built = datasets.load_from_disk(str(folders["dots"]))
    test = datasets.load_from_disk(str(zoo.dataset_path("dots")))["test"]
    assert list(built) == list(CORRUPTIONS)
    for kind in CORRUPTIONS:
        assert built[kind]["label"] == test["label"] and built[kind].features == test.features
    # Each split is the zoo's test split corrupted image by image, in order.
    rng = np.random.default_rng(np.random.SeedSequence([zoo.seed, zoo.tasks.index("dots"), 2, severity]))
    first = corrupt(np.asarray(test[0]["image"]), CORRUPTIONS[2], severity, rng)
    assert np.array_equal(np.asarray(built[CORRUPTIONS[2]][0]["image"]), first)
    # Reused, not rebuilt; rebuilt from scratch, the same pixels.
    pixels = {kind: np.stack([np.asarray(im) for im in built[kind]["image"]]) for kind in CORRUPTIONS}
    stamp = (folders["dots"] / "dataset_dict.json").stat().st_mtime_ns
    assert get_corrupted_test_sets(zoo, ["dots"], severity=severity, progress=False) == folders
    assert (folders["dots"] / "dataset_dict.json").stat().st_mtime_ns == stamp
    shutil.rmtree(corrupted_dir(zoo, severity))
    rebuilt = datasets.load_from_disk(str(get_corrupted_test_sets(zoo, ["dots"], severity, progress=False)["dots"]))
    for kind in CORRUPTIONS:
        assert np.array_equal(np.stack([np.asarray(im) for im in rebuilt[kind]["image"]]), pixels[kind])
    assert _hashes(zoo.root) == before  # the zoo's own folders are untouched
    with pytest.raises(WEMoEError, match="unknown toy task"):
        get_corrupted_test_sets(zoo, ["fog"], severity=severity)
