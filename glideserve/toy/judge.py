"""Prompt-adherence judge for the toy task, from pixel statistics and template matching.

No learned weights: the background is the palette colour that dominates the image
border, the shape colour is the palette colour that dominates the remaining pixels, and
the shape is the template (circle, square, upright triangle) that best overlaps the
segmented foreground after being fitted to its area and centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from glideserve.toy import dataset

FIELDS = ("background", "color", "shape")
BORDER = 3  # pixels; the largest shape plus jitter leaves at least 8 pixels of background on every side
MIN_FOREGROUND_FRACTION = 0.03  # below this there is no shape to classify
_AREA_TO_SIZE = {
    "circle": lambda area: 2.0 * math.sqrt(area / math.pi),
    "square": lambda area: math.sqrt(area),
    "triangle": lambda area: math.sqrt(4.0 * area / math.sqrt(3.0)),
}


@dataclass(frozen=True)
class Verdict:
    """What the judge reads from one image; a field is ``None`` when it cannot be recovered."""

    background: str | None
    color: str | None
    shape: str | None
    shape_iou: float  # overlap of the foreground with the chosen template (0 when no shape)

    def matches(self, color: str, shape: str, background: str) -> dict[str, bool]:
        return {"background": self.background == background, "color": self.color == color,
                "shape": self.shape == shape}


def _palette(colors: dict[str, tuple[int, int, int]]) -> tuple[tuple[str, ...], np.ndarray]:
    names = tuple(colors)
    return names, np.array([colors[name] for name in names], dtype=np.float32)


def _nearest_palette(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    distances = ((pixels[..., None, :] - palette) ** 2).sum(-1)
    return distances.argmin(-1)


def _majority(indices: np.ndarray, size: int) -> int:
    return int(np.bincount(indices.ravel(), minlength=size).argmax())


def _template(shape: str, area: float, centroid_x: float, centroid_y: float, side: int) -> np.ndarray:
    size = _AREA_TO_SIZE[shape](area)
    # The triangle's centroid sits a sixth of its height below the centre of its bounding box.
    offset = size * math.sqrt(3.0) / 12.0 if shape == "triangle" else 0.0
    return dataset.shape_mask(shape, size, centroid_x + 0.5, centroid_y + 0.5 - offset, side)


def classify_shape(mask: np.ndarray, min_pixels: int | None = None) -> tuple[str | None, float]:
    """Best-overlapping shape template for a boolean foreground mask, with its IoU; no shape below
    ``min_pixels`` (default: ``MIN_FOREGROUND_FRACTION`` of the image)."""
    area = float(mask.sum())
    if area < (MIN_FOREGROUND_FRACTION * mask.size if min_pixels is None else min_pixels):
        return None, 0.0
    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()), float(ys.mean())
    best, best_iou = None, -1.0
    for shape in dataset.SHAPES:
        template = _template(shape, area, cx, cy, mask.shape[0])
        iou = float((template & mask).sum() / max(1, (template | mask).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def judge_image(image: np.ndarray, colors: dict[str, tuple[int, int, int]] = dataset.COLORS) -> Verdict:
    """Read background colour, shape colour and shape from one ``(H, W, 3)`` uint8 image; ``colors``
    is the palette it reads against (``dataset.ALL_COLORS`` to recognise the fine-tuning concepts too)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {image.shape}")
    names, palette = _palette(colors)
    pixels = image.astype(np.float32)
    nearest = _nearest_palette(pixels, palette)
    border = np.ones(nearest.shape, dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = _majority(nearest[border], len(names))
    candidates = nearest != background
    if candidates.sum() < MIN_FOREGROUND_FRACTION * candidates.size:
        return Verdict(names[background], None, None, 0.0)
    color = _majority(nearest[candidates], len(names))
    # Two-class segmentation: a pixel belongs to the shape when it is closer to the shape
    # colour than to the background colour (robust to soft edges of generated images).
    to_color = ((pixels - palette[color]) ** 2).sum(-1)
    to_background = ((pixels - palette[background]) ** 2).sum(-1)
    shape, iou = classify_shape(to_color < to_background)
    return Verdict(names[background], names[color], shape, iou)


def accuracy(verdicts: list[Verdict], expected: list[tuple[str, str, str]]) -> dict[str, float]:
    """Fraction correct per field and for all three together; ``expected`` holds (color, shape, background)."""
    if len(verdicts) != len(expected) or not verdicts:
        raise ValueError("need one expected (color, shape, background) triple per verdict, and at least one")
    hits = [v.matches(*e) for v, e in zip(verdicts, expected)]
    result = {field: sum(h[field] for h in hits) / len(hits) for field in FIELDS}
    result["all"] = sum(all(h.values()) for h in hits) / len(hits)
    return result
