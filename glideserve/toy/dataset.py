"""The toy task: one flat-coloured shape on a plain background, drawn procedurally.

Every image is a deterministic function of its :class:`ShapeSample` and a dataset is a
deterministic function of its seed, so the training data, the tests and the
prompt-adherence judge all agree on what a caption means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 140, 0),
    "purple": (150, 0, 200),
}
# Colours no bundled model was trained on: concepts to teach by fine-tuning (``glideserve finetune``).
NEW_COLORS: dict[str, tuple[int, int, int]] = {"pink": (255, 105, 180)}
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NEW_COLORS}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MIN_SIZE_FRACTION = 0.40
MAX_SIZE_FRACTION = 0.65
MAX_JITTER = 3.0


def caption(color: str, shape: str, background: str) -> str:
    """The one caption form the toy models are trained on."""
    return f"a {color} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every valid ``(color, shape, background)`` triple (8 * 7 * 3 = 168), in a fixed order."""
    return [(color, shape, background)
            for color in COLORS for shape in SHAPES for background in COLORS if background != color]


def all_captions() -> list[str]:
    return [caption(*combo) for combo in all_combinations()]


@dataclass(frozen=True)
class ShapeSample:
    """Everything that determines one image: the caption fields plus size and centre in pixels."""

    color: str
    shape: str
    background: str
    size: float
    center_x: float
    center_y: float

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def shape_mask(shape: str, size: float, center_x: float, center_y: float,
               image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a shape whose bounding box is ``size`` wide, centred at the given point.

    The triangle is upright and equilateral, so its box is ``size`` wide and
    ``size * sqrt(3) / 2`` tall. Pixel centres are sampled (no anti-aliasing), which keeps
    the drawn colours exactly those of the palette.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    x = coords[None, :] - center_x
    y = coords[:, None] - center_y
    half = size / 2.0
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    height = size * math.sqrt(3.0) / 2.0
    top, bottom = -height / 2.0, height / 2.0
    # Half-width grows linearly from the apex (top) to the base (bottom).
    half_width = half * (y - top) / height
    return (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)


def render(sample: ShapeSample, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 image of one sample."""
    for name in (sample.color, sample.background):
        if name not in ALL_COLORS:
            raise ValueError(f"unknown color {name!r}; choose one of {', '.join(ALL_COLORS)}")
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = ALL_COLORS[sample.background]
    mask = shape_mask(sample.shape, sample.size, sample.center_x, sample.center_y, image_size)
    image[mask] = ALL_COLORS[sample.color]
    return image


def random_samples(count: int, seed: int, image_size: int = IMAGE_SIZE,
                   combinations: list[tuple[str, str, str]] | None = None) -> list[ShapeSample]:
    """``count`` samples; the caption triples cycle through ``combinations`` (all 168 by default)
    in a seeded random order, so every caption is equally represented."""
    combos = all_combinations() if combinations is None else combinations
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-count // len(combos)))])[:count]
    sizes = rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION, count) * image_size
    jitter = rng.uniform(-MAX_JITTER, MAX_JITTER, (count, 2))
    centre = image_size / 2.0
    return [ShapeSample(*combos[k], size=float(sizes[i]), center_x=float(centre + jitter[i, 0]),
                        center_y=float(centre + jitter[i, 1]))
            for i, k in enumerate(order)]


def render_batch(samples: list[ShapeSample], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images of ``samples``."""
    return np.stack([render(s, image_size) for s in samples]) if samples else np.zeros(
        (0, image_size, image_size, 3), dtype=np.uint8)


def to_model_range(images: np.ndarray):
    """uint8 ``(N, H, W, 3)`` -> float tensor ``(N, 3, H, W)`` in [-1, 1], the VAE's input range."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
