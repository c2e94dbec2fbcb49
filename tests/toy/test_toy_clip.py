"""The shipped toy CLIP: it ranks the right caption first on dataset images, its score and FID move
the right way, and it loads from safetensors."""

from __future__ import annotations

import numpy as np
import pytest

from glideserve.toy import contrastive, scenes


@pytest.fixture(scope="module")
def toy_clip():
    return contrastive.load_toy_clip()


def test_the_right_caption_ranks_first_on_held_out_dataset_images(toy_clip):
    accuracy = contrastive.retrieval_accuracy(toy_clip, per_level=60)
    # Candidates: every caption of the level's sample, and for relations their reversed / colour-swapped twins.
    assert accuracy["easy"] >= 0.9 and accuracy["medium"] >= 0.8 and accuracy["hard"] >= 0.6, accuracy


def test_score_and_fid_prefer_images_that_match_their_captions(toy_clip):
    captions = [c for level in scenes.evaluation_captions(40, seed=3).values() for c in level]
    right = contrastive.reference_images(captions, seed=1)
    wrong = right[np.roll(np.arange(len(right)), 7)]  # each image shown with another caption
    assert toy_clip.score(right, captions).mean() > toy_clip.score(wrong, captions).mean() + 5
    same = contrastive.toy_fid(toy_clip, contrastive.reference_images(captions, seed=2), right)
    noise = np.random.default_rng(0).integers(0, 256, right.shape, dtype=np.uint8)
    assert same < contrastive.toy_fid(toy_clip, noise, right) / 5


def test_the_shipped_weights_are_safetensors_only():
    folder = contrastive.bundled_toy_clip_dir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "toy_clip.safetensors"]
