import re

import numpy as np
import pytest

from glideserve.toy import dataset

CAPTION = re.compile(r"^a (\w+) (circle|square|triangle) on a (\w+) background$")


def test_every_combination_is_a_valid_caption_once():
    combos = dataset.all_combinations()
    assert len(combos) == 168 == len(set(combos))
    for color, shape, background in combos:
        assert color != background
        match = CAPTION.match(dataset.caption(color, shape, background))
        assert match and match.groups() == (color, shape, background)
        assert color in dataset.COLORS and background in dataset.COLORS


def test_same_seed_same_images_other_seed_other_images():
    first = dataset.render_batch(dataset.random_samples(40, seed=5))
    again = dataset.render_batch(dataset.random_samples(40, seed=5))
    other = dataset.render_batch(dataset.random_samples(40, seed=6))
    assert first.shape == (40, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_samples_cover_captions_evenly_with_sizes_and_jitter_in_range():
    samples = dataset.random_samples(2 * 168, seed=0)
    counts = {}
    for s in samples:
        counts[s.caption] = counts.get(s.caption, 0) + 1
        assert 0.40 * 64 <= s.size <= 0.65 * 64
        assert abs(s.center_x - 32) <= 3 and abs(s.center_y - 32) <= 3
    assert set(counts.values()) == {2} and len(counts) == 168


def test_render_uses_exactly_the_caption_colours():
    sample = dataset.ShapeSample("purple", "triangle", "yellow", size=30.0, center_x=32.0, center_y=32.0)
    image = dataset.render(sample)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {dataset.COLORS["purple"], dataset.COLORS["yellow"]}
    assert tuple(image[0, 0]) == dataset.COLORS["yellow"] and tuple(image[32, 32]) == dataset.COLORS["purple"]


@pytest.mark.parametrize("shape, fill", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_shape_masks_have_the_expected_area(shape, fill):
    size = 40.0
    height = size * (3 ** 0.5 / 2 if shape == "triangle" else 1.0)
    area = dataset.shape_mask(shape, size, 32.0, 32.0).sum()
    assert area == pytest.approx(fill * size * height, rel=0.05)


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="circle"):
        dataset.shape_mask("hexagon", 30.0, 32.0, 32.0)
    with pytest.raises(ValueError, match="choose one of"):
        dataset.render(dataset.ShapeSample("teal", "circle", "red", 30.0, 32.0, 32.0))
