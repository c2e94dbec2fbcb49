"""The compositional task: scenes of graded difficulty, drawn procedurally like the shapes task.

Every caption parses back into a :class:`CaptionSpec` (what it asks for), and every scene is
a deterministic function of the seed it was drawn with, so training, tests and the judge
agree on what a caption means. Three difficulty levels:

- ``easy``: one shape, the shapes task's own captions (``a red circle on a blue background``);
- ``medium``: a count (``two yellow triangles on a black background``, 1-3 objects, all alike)
  or a size (``a small red circle on a blue background``; ``small`` or ``large``);
- ``hard``: two objects of different shapes and a relation (``a red circle to the left of a
  green square on a white background``; left of, right of, above, below). The two colours
  may be equal; neither is the background's.

Objects never touch (at least ``MIN_GAP`` pixels apart) and keep ``EDGE_MARGIN`` pixels
from the border, which stays background, so the judge reads dataset images exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from glideserve.toy import dataset
from glideserve.toy.dataset import COLORS, IMAGE_SIZE, SHAPES, shape_mask

DIFFICULTIES = ("easy", "medium", "hard")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
SIZE_WORDS = ("small", "large")
SIZE_RANGES = {"small": (0.22, 0.32), "large": (0.55, 0.70)}  # fractions of the side
OBJECT_RANGE = (0.22, 0.34)  # counted and related objects
EDGE_MARGIN = 5
MIN_GAP = 4
# Words the compositional captions add to the shapes task's vocabulary.
CAPTION_WORDS = ("one", "two", "three", "circles", "squares", "triangles", "left", "right", "above", "below")


@dataclass(frozen=True)
class CaptionSpec:
    """What one caption asks for. ``kind`` is ``single``, ``count``, ``size`` or ``relation``;
    ``color``/``shape`` the (first) object, ``count`` how many of it, ``size`` its size word,
    and for a relation ``relation`` with the second object ``color2``/``shape2``."""

    kind: str
    background: str
    color: str
    shape: str
    count: int = 1
    size: str | None = None
    relation: str | None = None
    color2: str | None = None
    shape2: str | None = None

    @property
    def difficulty(self) -> str:
        return {"single": "easy", "count": "medium", "size": "medium", "relation": "hard"}[self.kind]

    @property
    def skills(self) -> tuple[str, ...]:
        """The judge's skills this caption tests."""
        extra = {"single": (), "count": ("count",), "size": ("size",), "relation": ("position", "binding")}
        return ("background", "color", "shape", *extra[self.kind])

    @property
    def caption(self) -> str:
        tail = f" on a {self.background} background"
        if self.kind == "single":
            return dataset.caption(self.color, self.shape, self.background)
        if self.kind == "size":
            return f"a {self.size} {self.color} {self.shape}{tail}"
        if self.kind == "count":
            noun = self.shape if self.count == 1 else self.shape + "s"
            return f"{NUMBER_WORDS[self.count]} {self.color} {noun}{tail}"
        return f"a {self.color} {self.shape} {self.relation} a {self.color2} {self.shape2}{tail}"


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PATTERNS = {
    "relation": re.compile(rf"a ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE}) "
                           rf"on a ({_COLOR}) background"),
    "size": re.compile(rf"a ({'|'.join(SIZE_WORDS)}) ({_COLOR}) ({_SHAPE}) on a ({_COLOR}) background"),
    "count": re.compile(rf"({'|'.join(NUMBER_WORDS.values())}) ({_COLOR}) ({_SHAPE})s? on a ({_COLOR}) background"),
    "single": re.compile(rf"a ({_COLOR}) ({_SHAPE}) on a ({_COLOR}) background"),
}


def parse_caption(text: str) -> CaptionSpec:
    """The spec of a task caption; ValueError for text outside the task."""
    text = text.strip()
    for kind, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        if kind == "relation":
            c1, s1, rel, c2, s2, bg = m.groups()
            spec = CaptionSpec("relation", bg, c1, s1, relation=rel, color2=c2, shape2=s2)
        elif kind == "size":
            size, color, shape, bg = m.groups()
            spec = CaptionSpec("size", bg, color, shape, size=size)
        elif kind == "count":
            word, color, shape, bg = m.groups()
            count = next(n for n, w in NUMBER_WORDS.items() if w == word)
            spec = CaptionSpec("count", bg, color, shape, count=count)
        else:
            color, shape, bg = m.groups()
            spec = CaptionSpec("single", bg, color, shape)
        if spec.caption != text:  # e.g. "two red circle": the plural must agree with the number
            raise ValueError(f"{text!r} is not a caption of the task (did you mean {spec.caption!r}?)")
        _check(spec)
        return spec
    raise ValueError(f"{text!r} is not a caption of the task")


def _check(spec: CaptionSpec) -> None:
    colors = [spec.color] + ([spec.color2] if spec.color2 else [])
    if spec.background in colors:
        raise ValueError(f"{spec.caption!r}: an object has the background's colour")
    if spec.kind == "relation" and spec.shape == spec.shape2:
        raise ValueError(f"{spec.caption!r}: the two objects of a relation have different shapes")


def captions_of(difficulty: str) -> list[str]:
    """Every caption of one difficulty level, in a fixed order."""
    out = []
    for bg in COLORS:
        colors = [c for c in COLORS if c != bg]
        for color in colors:
            for shape in SHAPES:
                if difficulty == "easy":
                    out.append(CaptionSpec("single", bg, color, shape).caption)
                elif difficulty == "medium":
                    out += [CaptionSpec("count", bg, color, shape, count=n).caption for n in NUMBER_WORDS]
                    out += [CaptionSpec("size", bg, color, shape, size=s).caption for s in SIZE_WORDS]
                elif difficulty == "hard":
                    out += [CaptionSpec("relation", bg, color, shape, relation=rel, color2=c2, shape2=s2).caption
                            for rel in RELATIONS for c2 in colors for s2 in SHAPES if s2 != shape]
                else:
                    raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    return out


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: colour, shape, bounding-box size and centre, in pixels."""

    color: str
    shape: str
    size: float
    center_x: float
    center_y: float


@dataclass(frozen=True)
class Scene:
    """A caption's spec and the objects drawn for it."""

    spec: CaptionSpec
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        return self.spec.caption


def _box(obj: SceneObject) -> tuple[float, float, float, float]:
    half = obj.size / 2
    return obj.center_x - half, obj.center_y - half, obj.center_x + half, obj.center_y + half


def _apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0


def _place(rng: np.random.Generator, color: str, shape: str, size: float) -> SceneObject:
    low, high = EDGE_MARGIN + size / 2, IMAGE_SIZE - EDGE_MARGIN - size / 2
    return SceneObject(color, shape, size, float(rng.uniform(low, high)), float(rng.uniform(low, high)))


def draw_scene(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """Objects for ``spec``, placed at random under the task's rules (rejection sampling)."""
    side = IMAGE_SIZE
    if spec.kind in ("single", "size"):
        low, high = SIZE_RANGES[spec.size] if spec.kind == "size" else (dataset.MIN_SIZE_FRACTION,
                                                                          dataset.MAX_SIZE_FRACTION)
        size = float(rng.uniform(low, high)) * side
        jitter = rng.uniform(-dataset.MAX_JITTER, dataset.MAX_JITTER, 2)
        return Scene(spec, (SceneObject(spec.color, spec.shape, size, side / 2 + jitter[0], side / 2 + jitter[1]),))
    while True:
        if spec.kind == "count":
            objects = [_place(rng, spec.color, spec.shape, float(rng.uniform(*OBJECT_RANGE)) * side)
                       for _ in range(spec.count)]
        else:
            objects = [_place(rng, spec.color, spec.shape, float(rng.uniform(*OBJECT_RANGE)) * side),
                       _place(rng, spec.color2, spec.shape2, float(rng.uniform(*OBJECT_RANGE)) * side)]
        if not all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            continue
        if spec.kind == "relation" and not relation_holds(spec.relation, objects[0], objects[1], strict=True):
            continue
        return Scene(spec, tuple(objects))


def relation_holds(relation: str, a, b, strict: bool = False) -> bool:
    """Whether ``a`` is ``relation`` ``b`` (objects with ``center_x``/``center_y``): the offset along the
    relation's axis has the right sign and dominates the other axis (twice over when ``strict``, as drawn;
    at least as much when judging)."""
    axis, sign = RELATIONS[relation]
    d = (a.center_x - b.center_x, a.center_y - b.center_y)
    along, across = d[axis] * sign, abs(d[1 - axis])
    return along > 0 and along >= (2.0 if strict else 1.0) * across


def render_scene(scene: Scene) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 image of a scene (pixel centres sampled: palette colours only)."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = COLORS[scene.spec.background]
    for obj in scene.objects:
        image[shape_mask(obj.shape, obj.size, obj.center_x, obj.center_y)] = COLORS[obj.color]
    return image


DEFAULT_MIX = {"easy": 0.2, "medium": 0.3, "hard": 0.5}


def sample_specs(count: int, seed: int, mix: dict[str, float] | None = None) -> list[CaptionSpec]:
    """``count`` caption specs drawn with the difficulty shares of ``mix`` (default: weighted to the hard)."""
    mix = mix or DEFAULT_MIX
    rng = np.random.default_rng(seed)
    pools = {level: captions_of(level) for level in mix}
    levels = rng.choice(list(mix), size=count, p=np.array(list(mix.values())) / sum(mix.values()))
    return [parse_caption(pools[level][int(rng.integers(len(pools[level])))]) for level in levels]


def sample_scenes(count: int, seed: int, mix: dict[str, float] | None = None) -> list[Scene]:
    """``count`` scenes: specs from ``sample_specs`` and their objects, all from ``seed``."""
    specs = sample_specs(count, seed, mix)
    rng = np.random.default_rng(seed + 1)
    return [draw_scene(spec, rng) for spec in specs]


def evaluation_captions(per_level: int, seed: int = 0) -> dict[str, list[str]]:
    """A fixed sample of ``per_level`` captions of each difficulty (all of a level if it has fewer)."""
    rng = np.random.default_rng(seed)
    out = {}
    for level in DIFFICULTIES:
        pool = captions_of(level)
        picks = rng.choice(len(pool), size=min(per_level, len(pool)), replace=False)
        out[level] = [pool[int(i)] for i in sorted(picks)]
    return out
