"""A GenEval-style judge for the compositional task: per-skill scores from pixels, no learned weights.

It reads an image into objects: the background is the palette colour dominating the border;
each other palette colour's pixels are split into connected components (4-neighbour), and
every component of at least ``MIN_OBJECT_PIXELS`` is an object with its colour, centroid,
area and shape (the best-fitting template, as the shapes judge does). A caption's spec then
says which skills to score:

- ``background``: the border colour;
- ``color`` / ``shape``: the caption's objects are there (for a count: every object has the
  colour and shape; for a relation: both colours and both shapes are present);
- ``count``: the number of objects; ``size``: the object's size word (``small`` below
  ``SIZE_SPLIT`` of the side, ``large`` above it);
- ``position``: the relation holds between the object of the first shape and that of the
  second; ``binding``: those two objects have their own colours;
- ``all``: every skill the caption tests.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from glideserve.toy import judge as shapes_judge
from glideserve.toy.dataset import COLORS
from glideserve.toy.scenes import DIFFICULTIES, CaptionSpec, parse_caption, relation_holds

SKILLS = ("background", "color", "shape", "count", "size", "position", "binding")
MIN_OBJECT_PIXELS = 30  # the smallest drawn object (a 14-pixel triangle) has about 85
SIZE_SPLIT = 0.43  # between the small (<= 0.32) and large (>= 0.55) ranges


@dataclass(frozen=True)
class DetectedObject:
    """One connected region of a palette colour."""

    color: str
    shape: str | None
    area: int
    center_x: float
    center_y: float
    size: float  # the template size fitted to its area, in pixels


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as a boolean mask (iterative flood fill)."""
    seen = np.zeros_like(mask)
    out = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        component = np.zeros_like(mask)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            component[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(component)
    return out


def detect(image: np.ndarray) -> tuple[str, list[DetectedObject]]:
    """The background colour and the objects of one ``(H, W, 3)`` uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {image.shape}")
    names, palette = shapes_judge._palette(COLORS)
    nearest = shapes_judge._nearest_palette(image.astype(np.float32), palette)
    border = np.ones(nearest.shape, dtype=bool)
    border[shapes_judge.BORDER:-shapes_judge.BORDER, shapes_judge.BORDER:-shapes_judge.BORDER] = False
    background = shapes_judge._majority(nearest[border], len(names))
    objects = []
    for index in np.unique(nearest):
        if index == background:
            continue
        for component in _components(nearest == index):
            area = int(component.sum())
            if area < MIN_OBJECT_PIXELS:
                continue
            shape, _ = shapes_judge.classify_shape(component, min_pixels=MIN_OBJECT_PIXELS)
            ys, xs = np.nonzero(component)
            size = shapes_judge._AREA_TO_SIZE[shape](area) if shape else 0.0
            objects.append(DetectedObject(names[index], shape, area, float(xs.mean()) + 0.5,
                                          float(ys.mean()) + 0.5, size))
    return names[background], objects


def _largest(objects: list[DetectedObject], **match) -> DetectedObject | None:
    found = [o for o in objects if all(getattr(o, k) == v for k, v in match.items())]
    return max(found, key=lambda o: o.area) if found else None


def score(image: np.ndarray, spec: CaptionSpec | str) -> dict[str, bool]:
    """Each skill the caption tests (see the module docstring), and ``all``."""
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    background, objects = detect(image)
    side = image.shape[0]
    result = {"background": background == spec.background}
    if spec.kind in ("single", "size"):
        main = _largest(objects)
        result["color"] = main is not None and main.color == spec.color
        result["shape"] = main is not None and main.shape == spec.shape
        if spec.kind == "size":
            result["size"] = main is not None and (main.size < SIZE_SPLIT * side) == (spec.size == "small")
    elif spec.kind == "count":
        result["color"] = bool(objects) and all(o.color == spec.color for o in objects)
        result["shape"] = bool(objects) and all(o.shape == spec.shape for o in objects)
        result["count"] = len(objects) == spec.count
    else:
        colors, shapes = {o.color for o in objects}, {o.shape for o in objects}
        result["color"] = {spec.color, spec.color2} <= colors
        result["shape"] = {spec.shape, spec.shape2} <= shapes
        first, second = _largest(objects, shape=spec.shape), _largest(objects, shape=spec.shape2)
        found = first is not None and second is not None
        result["position"] = found and relation_holds(spec.relation, first, second)
        result["binding"] = found and first.color == spec.color and second.color == spec.color2
    result["all"] = all(result.values())
    return result


def summarize(captions: list[str], scores: list[dict[str, bool]]) -> dict[str, dict[str, float]]:
    """Per difficulty level (and ``overall``): the fraction correct of each skill it tests, ``all``,
    and ``n`` (images)."""
    groups: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for caption, s in zip(captions, scores, strict=True):
        groups[parse_caption(caption).difficulty].append(s)
        groups["overall"].append(s)
    out = {}
    for level in (*DIFFICULTIES, "overall"):
        rows = groups.get(level)
        if not rows:
            continue
        summary = {skill: sum(r[skill] for r in rows if skill in r) / sum(skill in r for r in rows)
                   for skill in (*SKILLS, "all") if any(skill in r for r in rows)}
        summary["n"] = len(rows)
        out[level] = summary
    return out
