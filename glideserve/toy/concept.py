"""A concept the bundled models never saw (a new colour), as a fine-tuning dataset and its evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from glideserve.toy import dataset


def concept_combinations(color: str) -> list[tuple[str, str, str]]:
    """Every (color, shape, background) with the new ``color`` as the shape's colour, on a known background."""
    if color not in dataset.NEW_COLORS:
        raise ValueError(f"unknown new concept {color!r}; choose one of {', '.join(dataset.NEW_COLORS)}")
    return [(color, shape, background) for shape in dataset.SHAPES for background in dataset.COLORS]


def write_concept_dataset(folder: Path, color: str, count: int, seed: int = 0, prior: int = 0) -> Path:
    """``count`` image + caption pairs of the concept, one PNG and one .txt each, in a new ``folder``; plus
    ``prior`` pairs of the concepts the model knows (DreamBooth's prior preservation: without them the
    adapter drifts the old colours towards the new one)."""
    samples = dataset.random_samples(count, seed, combinations=concept_combinations(color))
    if prior:
        samples += dataset.random_samples(prior, seed + 1)
    folder.mkdir(parents=True, exist_ok=False)
    for i, sample in enumerate(samples):
        Image.fromarray(dataset.render(sample)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(sample.caption + "\n", encoding="utf-8")
    return folder


def evaluation_triples(color: str, old_per_color: int = 1, seed: int = 0) -> dict[str, list[tuple[str, str, str]]]:
    """Captions to judge: every combination of the new colour, and a seeded sample of the old ones."""
    rng = np.random.default_rng(seed)
    old = dataset.all_combinations()
    picks = rng.choice(len(old), size=min(len(old), old_per_color * len(dataset.COLORS) * len(dataset.SHAPES)),
                       replace=False)
    return {"new": concept_combinations(color), "old": [old[int(i)] for i in sorted(picks)]}
