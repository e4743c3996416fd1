"""The toy tasks: small 32x32 RGB image-classification problems, each with its own label space.

One task (``digits``) uses the real handwritten digits that ship with scikit-learn; the others are drawn
procedurally, each with clearly different image statistics (flat shapes, Gabor-like gratings, colour fields,
dot counts, road-sign arrows, landscapes, textures), so that a router can tell the tasks apart from token
states.

Every generator is a pure function of a :class:`numpy.random.Generator`: the same seed gives the same pixels.
Class names are plain words so they fit prompt templates such as ``"a photo of a {c}."``; each task carries a
few templates of its own (``TASKS[name].templates``) for building CLIP zero-shot heads.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["IMAGE_SIZE", "TASKS", "ToyTask", "apply_domain_shift", "generate_split", "task_names"]

#: Side length of every toy image, in pixels.
IMAGE_SIZE = 32
# Procedural images are drawn at twice the size and downsampled, which gives anti-aliased edges.
_SUPER = 2 * IMAGE_SIZE

Generator = Callable[[np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class ToyTask:
    """One toy task: its class names, prompt templates and image generator.

    Attributes:
        name: Task identifier (also the dataset folder name and the expert suffix).
        classnames: One word (or short phrase) per label, in label order.
        templates: Prompt templates with a ``{c}`` placeholder for the class name.
        description: One line saying what the images show.
        source: ``"sklearn"`` for real images shipped with scikit-learn, ``"procedural"`` otherwise.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    description: str
    source: str = "procedural"
    generator: Generator | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """Number of labels."""
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """The task's templates filled with one class name."""
        return [t.replace("{c}", classname) for t in self.templates]


# ----------------------------------------------------------------------------------------------------------
# Small drawing helpers
# ----------------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _random_colour(rng: np.random.Generator, v_low: float = 0.5, v_high: float = 1.0) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(v_low, v_high))


def _finish(img: Image.Image, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Downsample a supersampled canvas to 32x32 and add Gaussian pixel noise."""
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, points: Sequence[tuple[float, float]], scale: float, angle: float):
    """Rotate (radians) and scale unit-shape points around the origin, then move them to (cx, cy)."""
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in points]


def _hsv_array(hue: float, sat: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV to RGB for one hue and per-pixel saturation/value; returns floats in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] * (1.0 - sat[..., None] * ramp)


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (32, 32): bicubic upsampling of a coarse random grid."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), mode="L")
    return (
        np.asarray(coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    )


# ----------------------------------------------------------------------------------------------------------
# digits: real handwritten digits from scikit-learn (8x8, 0..16), upscaled and colourised
# ----------------------------------------------------------------------------------------------------------

_DIGITS_CACHE: dict[str, np.ndarray] = {}


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    if not _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        data = load_digits()
        _DIGITS_CACHE["images"] = (data.images / 16.0).astype(np.float32)
        _DIGITS_CACHE["target"] = data.target.astype(np.int64)
    return _DIGITS_CACHE["images"], _DIGITS_CACHE["target"]


def _digits_split_indices(split: str) -> np.ndarray:
    """A fixed 70/30 split of the 1,797 scikit-learn digits, stratified, independent of the build seed."""
    _, target = _sklearn_digits()
    rng = np.random.default_rng(1797)
    train, test = [], []
    for label in range(10):
        idx = np.flatnonzero(target == label)
        idx = idx[rng.permutation(len(idx))]
        cut = int(round(0.7 * len(idx)))
        train.extend(idx[:cut])
        test.extend(idx[cut:])
    chosen = np.array(sorted(train if split == "train" else test))
    return chosen


def _render_digit(rng: np.random.Generator, index: int) -> np.ndarray:
    images, _ = _sklearn_digits()
    glyph = images[index]
    # Upscale 4x (each handwritten pixel becomes a 4x4 block, blurred by bilinear interpolation).
    up = Image.fromarray((glyph * 255).astype(np.uint8), mode="L").resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
    )
    canvas = np.asarray(up, dtype=np.float32) / 255
    bg = np.array(_hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.0, 0.35)), dtype=np.float32)
    fg = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.75, 1.0)), dtype=np.float32)
    arr = bg[None, None, :] * (1 - canvas[..., None]) + fg[None, None, :] * canvas[..., None]
    arr = arr + rng.normal(0.0, 8.0, size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# shapes: one flat filled shape on a light background
# ----------------------------------------------------------------------------------------------------------


def _star(n: int, inner: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / n - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_SHAPE_POINTS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)],
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "cross": [
        (-0.3, -1.0),
        (0.3, -1.0),
        (0.3, -0.3),
        (1.0, -0.3),
        (1.0, 0.3),
        (0.3, 0.3),
        (0.3, 1.0),
        (-0.3, 1.0),
        (-0.3, 0.3),
        (-1.0, 0.3),
        (-1.0, -0.3),
        (-0.3, -0.3),
    ],  # fmt: skip
    "star": _star(5, 0.45),
}
_SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")


def _gen_shapes(rng: np.random.Generator, label: int) -> np.ndarray:
    bg = _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0))
    fg = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.8))
    img = Image.new("RGB", (_SUPER, _SUPER), bg)
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(13, 23)
    cx, cy = rng.uniform(scale + 2, _SUPER - scale - 2, size=2)
    name = _SHAPES[label]
    if name == "circle":
        draw.ellipse([cx - scale * 0.85, cy - scale * 0.85, cx + scale * 0.85, cy + scale * 0.85], fill=fg)
    else:
        angle = rng.uniform(-0.3, 0.3)
        draw.polygon(_polygon(cx, cy, _SHAPE_POINTS[name], scale, angle), fill=fg)
    return _finish(img, rng, noise=6.0)


# ----------------------------------------------------------------------------------------------------------
# gratings: a noisy sinusoidal grating seen through a round window (a Gabor-like patch on a grey
# surround); the class is its orientation
# ----------------------------------------------------------------------------------------------------------

_GRATING_ANGLES = {"horizontal": 0.0, "rising": 45.0, "vertical": 90.0, "falling": 135.0}


def _gen_gratings(rng: np.random.Generator, label: int) -> np.ndarray:
    name = tuple(_GRATING_ANGLES)[label]
    # The angle is the direction the stripes run in (image y axis points down, hence the sign).
    theta = math.radians(_GRATING_ANGLES[name] + rng.uniform(-16, 16))
    period = rng.uniform(3.5, 8.0)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    # Distance across the stripes: the normal of a line running at theta.
    across = -xx * math.sin(theta) - yy * math.cos(theta)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * across / period + rng.uniform(0, 2 * math.pi))
    # Nearly grey stripes (classic Gabor patches), unlike the colourful textures task.
    tint = rng.random()
    c1 = np.array(_hsv(tint, rng.uniform(0.0, 0.25), rng.uniform(0.0, 0.35)), dtype=np.float32)
    c2 = np.array(_hsv(tint, rng.uniform(0.0, 0.25), rng.uniform(0.7, 1.0)), dtype=np.float32)
    patch = c1 * (1 - wave[..., None]) + c2 * wave[..., None]
    cx, cy = rng.uniform(13, 19, size=2)
    radius = rng.uniform(8, 12)
    window = np.clip((radius - np.hypot(xx - cx, yy - cy)) / 2.0, 0.0, 1.0)[..., None]
    grey = np.float32(rng.uniform(100, 160))
    arr = grey * (1 - window) + patch * window
    arr = arr + rng.normal(0, 30.0, size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# colors: a blotchy colour field; the class is its hue
# ----------------------------------------------------------------------------------------------------------

_COLOR_HUES = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 115.0,
    "teal": 170.0,
    "blue": 220.0,
    "purple": 275.0,
    "pink": 325.0,
}


def _gen_colors(rng: np.random.Generator, label: int) -> np.ndarray:
    hue = (tuple(_COLOR_HUES.values())[label] + rng.uniform(-13, 13)) / 360.0
    value = 0.3 + 0.7 * _smooth_field(rng, int(rng.integers(3, 7)))
    sat = rng.uniform(0.35, 1.0) * (0.6 + 0.4 * _smooth_field(rng, 4))
    arr = _hsv_array(hue, sat, value) * 255
    # A grey distractor patch so that the whole image is never one colour.
    x0, y0 = rng.integers(0, IMAGE_SIZE - 10, size=2)
    w, h = rng.integers(6, 14, size=2)
    arr[y0 : y0 + h, x0 : x0 + w] = rng.uniform(60, 200)
    arr = arr + rng.normal(0, 10.0, size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# dots: count the bright dots on a dark background
# ----------------------------------------------------------------------------------------------------------

_NUMBERS = ("one", "two", "three", "four", "five")


def _gen_dots(rng: np.random.Generator, label: int) -> np.ndarray:
    count = label + 1
    bg = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.4))
    img = Image.new("RGB", (_SUPER, _SUPER), bg)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(4.0, 5.5)
        x, y = rng.uniform(r + 2, _SUPER - r - 2, size=2)
        if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 6) ** 2 for px, py, pr in placed):
            placed.append((x, y, r))
    for x, y, r in placed:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_random_colour(rng, 0.8, 1.0))
    return _finish(img, rng, noise=8.0)


# ----------------------------------------------------------------------------------------------------------
# arrows: a round road sign with a white arrow pointing in one of eight compass directions
# ----------------------------------------------------------------------------------------------------------

_DIRECTIONS = ("east", "northeast", "north", "northwest", "west", "southwest", "south", "southeast")
_ARROW = [(-1.0, -0.14), (0.25, -0.14), (0.25, -0.5), (1.0, 0.0), (0.25, 0.5), (0.25, 0.14), (-1.0, 0.14)]


def _gen_arrows(rng: np.random.Generator, label: int) -> np.ndarray:
    bg = np.array(_hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.5, 0.9)), dtype=np.float32)
    texture = _smooth_field(rng, 8)[..., None] * 60 - 30
    base = np.clip(np.kron(bg + texture, np.ones((2, 2, 1))), 0, 255).astype(np.uint8)
    img = Image.fromarray(base, mode="RGB")
    draw = ImageDraw.Draw(img)
    # A round road sign (blue, green or red disc with a white rim) carrying a white arrow.
    cx, cy = rng.uniform(-4, 4, size=2) + _SUPER / 2
    radius = rng.uniform(25, 30)
    disc = _hsv(
        rng.choice([0.0, 0.36, 0.6]) + rng.uniform(-0.03, 0.03), rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.8)
    )
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(235, 235, 235))
    inner = radius - 3
    draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=disc)
    # Compass angle counter-clockwise from east; image y points down, hence the minus sign.
    angle = -math.radians(45.0 * label + rng.uniform(-6, 6))
    scale = rng.uniform(0.7, 0.85) * inner
    draw.polygon(_polygon(cx, cy, _ARROW, scale, angle), fill=(245, 245, 245))
    return _finish(img, rng, noise=6.0)


# ----------------------------------------------------------------------------------------------------------
# scenes: crude landscapes (sky above a horizon, ground below, a few features)
# ----------------------------------------------------------------------------------------------------------

_SCENES = ("beach", "forest", "desert", "snowfield", "night", "sunset")


def _jitter(
    rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 40.0
) -> tuple[int, int, int]:
    c = np.clip(np.array(rgb) + rng.normal(0, amount, size=3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _gen_scenes(rng: np.random.Generator, label: int) -> np.ndarray:
    name = _SCENES[label]
    horizon = int(rng.uniform(0.35, 0.6) * _SUPER)
    sky = {
        "beach": (110, 180, 235),
        "forest": (150, 190, 220),
        "desert": (200, 215, 235),
        "snowfield": (190, 200, 215),
        "night": (15, 20, 55),
        "sunset": (235, 120, 60),
    }[name]
    ground = {
        "beach": (225, 205, 150),
        "forest": (40, 100, 40),
        "desert": (220, 160, 80),
        "snowfield": (240, 242, 248),
        "night": (25, 30, 30),
        "sunset": (60, 40, 45),
    }[name]
    img = Image.new("RGB", (_SUPER, _SUPER), _jitter(rng, sky))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, horizon, _SUPER, _SUPER], fill=_jitter(rng, ground))
    if name == "beach":
        sea = int(horizon + rng.uniform(6, 14))
        draw.rectangle([0, horizon, _SUPER, sea], fill=_jitter(rng, (30, 90, 170)))
    elif name == "forest":
        for _ in range(int(rng.integers(4, 9))):
            x, h = rng.uniform(0, _SUPER), rng.uniform(14, 30)
            base = horizon + rng.uniform(0, 12)
            draw.polygon(
                [(x, base - h), (x - h / 3, base), (x + h / 3, base)], fill=_jitter(rng, (20, 70, 25))
            )
    elif name == "desert":
        for _ in range(int(rng.integers(1, 3))):
            x, w = rng.uniform(0, _SUPER), rng.uniform(20, 40)
            top = horizon - rng.uniform(4, 10)
            draw.ellipse(
                [x - w, top, x + w, top + 2 * (horizon - top) + 6], fill=_jitter(rng, (200, 140, 70))
            )
    elif name == "snowfield":
        for _ in range(int(rng.integers(0, 4))):
            x, h = rng.uniform(0, _SUPER), rng.uniform(8, 18)
            draw.polygon([(x, horizon - h), (x - h / 3, horizon), (x + h / 3, horizon)], fill=(90, 100, 95))
    elif name == "night":
        for _ in range(int(rng.integers(6, 16))):
            x, y = rng.uniform(0, _SUPER), rng.uniform(0, horizon - 2)
            draw.rectangle([x, y, x + 1.5, y + 1.5], fill=(255, 255, 230))
    elif name == "sunset":
        r, x = rng.uniform(5, 10), rng.uniform(10, _SUPER - 10)
        draw.ellipse([x - r, horizon - r * 1.2, x + r, horizon + r * 0.8], fill=_jitter(rng, (255, 220, 90)))
        draw.rectangle([0, horizon, _SUPER, _SUPER], fill=_jitter(rng, ground))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return _finish(img, rng, noise=9.0)


# ----------------------------------------------------------------------------------------------------------
# textures: repeating two-colour patterns (checkered, striped, dotted, grid, speckled, wavy)
# ----------------------------------------------------------------------------------------------------------

_TEXTURES = ("checkered", "striped", "dotted", "grid", "speckled", "wavy")


def _gen_textures(rng: np.random.Generator, label: int) -> np.ndarray:
    name = _TEXTURES[label]
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    # A random rotation of the pattern's axes, so orientation carries no class information.
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a) + rng.uniform(0, 20)
    v = -xx * math.sin(a) + yy * math.cos(a) + rng.uniform(0, 20)
    period = rng.uniform(5.0, 9.0)
    if name == "checkered":
        mask = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif name == "striped":
        mask = (np.floor(u / period) % 2).astype(np.float32)
    elif name == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        mask = (du**2 + dv**2 < (period * 0.28) ** 2).astype(np.float32)
    elif name == "grid":
        width = period * 0.22
        mask = (((u % period) < width) | ((v % period) < width)).astype(np.float32)
    elif name == "speckled":
        mask = (rng.random((IMAGE_SIZE, IMAGE_SIZE)) < rng.uniform(0.15, 0.35)).astype(np.float32)
    else:  # wavy
        wave = np.sin(2 * math.pi * u / (2.5 * period)) * period * 0.45
        mask = (np.abs(((v + wave) % period) - period / 2) < period * 0.22).astype(np.float32)
    c1 = np.array(_random_colour(rng, 0.2, 0.6), dtype=np.float32)
    c2 = np.array(_random_colour(rng, 0.7, 1.0), dtype=np.float32)
    arr = c1 * (1 - mask[..., None]) + c2 * mask[..., None]
    arr = arr + rng.normal(0, 12.0, size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

TASKS: dict[str, ToyTask] = {
    task.name: task
    for task in (
        ToyTask(
            name="digits",
            classnames=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
            templates=(
                "a photo of the digit {c}.",
                "a handwritten digit {c}.",
                'a photo of the number: "{c}".',
            ),
            description="scikit-learn's handwritten digits (8x8 grey), upscaled and colourised",
            source="sklearn",
        ),
        ToyTask(
            name="shapes",
            classnames=_SHAPES,
            templates=("a drawing of a {c}.", "a photo of a {c} shape.", "a {c} on a plain background."),
            description="one filled shape of random colour, size and position on a light background",
            generator=_gen_shapes,
        ),
        ToyTask(
            name="gratings",
            classnames=tuple(_GRATING_ANGLES),
            templates=("a texture of {c} stripes.", "a photo of {c} lines.", "a noisy pattern of {c} bars."),
            description="a noisy grey grating in a round window; the class is its orientation",
            generator=_gen_gratings,
        ),
        ToyTask(
            name="colors",
            classnames=tuple(_COLOR_HUES),
            templates=("a photo of something {c}.", "a {c} texture.", "a blotchy {c} surface."),
            description="a blotchy colour field with a grey patch; the class is the hue",
            generator=_gen_colors,
        ),
        ToyTask(
            name="dots",
            classnames=_NUMBERS,
            templates=(
                "a photo of {c} dots.",
                "a picture with {c} bright spots.",
                "a dark card with {c} dots.",
            ),
            description="one to five bright dots on a dark background; the class is the count",
            generator=_gen_dots,
        ),
        ToyTask(
            name="arrows",
            classnames=_DIRECTIONS,
            templates=(
                "an arrow pointing {c}.",
                "a road sign pointing {c}.",
                "a photo of a sign with an arrow to the {c}.",
            ),
            description="a round road sign with a white arrow; the class is the direction it points to",
            generator=_gen_arrows,
        ),
        ToyTask(
            name="scenes",
            classnames=_SCENES,
            templates=("a photo of a {c}.", "a landscape photo of a {c}.", "a painting of a {c}."),
            description="crude landscapes: sky, horizon, ground and a few features",
            generator=_gen_scenes,
        ),
        ToyTask(
            name="textures",
            classnames=_TEXTURES,
            templates=("a photo of a {c} texture.", "a {c} pattern.", "a close-up of a {c} fabric."),
            description="rotated repeating two-colour patterns",
            generator=_gen_textures,
        ),
    )
}


def task_names() -> list[str]:
    """All toy task names, in registry order."""
    return list(TASKS)


# Independent random streams per split. "pretrain" is the base model's captioned corpus (not saved as a
# dataset): same generators, fresh samples, so the base never sees a task's train or test images.
_SPLITS = {"train": 0, "test": 1, "pretrain": 2}


def apply_domain_shift(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Move one image away from the pretraining distribution: a closer, noisier view of the same scene.

    The centre ``1 / (1 + strength / 2)`` of the image is enlarged back to 32x32 (bilinear) and Gaussian noise
    of standard deviation ``10 * strength`` is added. A task's train and test splits share the shift, the
    captioned pretraining corpus does not: the base model's features still apply, but its zero-shot accuracy
    drops, as for a web-pretrained CLIP on a specialised dataset. ``strength`` 0 leaves the image unchanged.
    """
    if strength <= 0:
        return image
    side = IMAGE_SIZE / (1.0 + 0.5 * strength)
    offset = (IMAGE_SIZE - side) / 2
    box = (offset, offset, offset + side, offset + side)
    zoomed = Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(zoomed, dtype=np.float32)
    arr = arr + rng.normal(0.0, 10.0 * strength, size=arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def generate_split(
    task: str, split: str, n: int, seed: int, domain_shift: float = 0.0
) -> tuple[list[np.ndarray], list[int]]:
    """Generate ``n`` images (uint8 arrays of shape (32, 32, 3)) and labels for one split of one task.

    Labels are balanced (``i % num_classes`` in a seeded random order). The result depends only on
    ``(task, split, n, seed, domain_shift)``; the train and test splits use independent random streams, and for
    ``digits`` the test split only uses handwritten samples never used in training. ``domain_shift`` applies
    :func:`apply_domain_shift` to the train and test splits (never to ``pretrain``).
    """
    images, labels = _generate(task, split, n, seed)
    if split != "pretrain" and domain_shift > 0:
        rng = np.random.default_rng(
            np.random.SeedSequence([seed, list(TASKS).index(task), _SPLITS[split], 1])
        )
        images = [apply_domain_shift(image, rng, domain_shift) for image in images]
    return images, labels


def _generate(task: str, split: str, n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    spec = TASKS[task]
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}")
    stream = np.random.SeedSequence([seed, list(TASKS).index(task), _SPLITS[split]])
    rng = np.random.default_rng(stream)
    labels = [int(x) for x in rng.permutation(np.arange(n) % spec.num_classes)]
    if spec.source == "sklearn":
        _, target = _sklearn_digits()
        # Pretraining draws from the training writers' samples: test digits are never seen before testing.
        pool = _digits_split_indices("test" if split == "test" else "train")
        by_label = {c: rng.permutation(pool[target[pool] == c]) for c in range(spec.num_classes)}
        seen = dict.fromkeys(range(spec.num_classes), 0)
        images = []
        for label in labels:
            candidates = by_label[label]
            # Cycle through the samples of a class (train reuses them with new colours/offsets).
            images.append(_render_digit(rng, int(candidates[seen[label] % len(candidates)])))
            seen[label] += 1
        return images, labels
    assert spec.generator is not None
    return [spec.generator(rng, label) for label in labels], labels
