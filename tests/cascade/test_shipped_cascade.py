"""The bundled cascade pair: glide-turbo's discriminator escalates hard prompts more than easy ones."""

from __future__ import annotations

import numpy as np

from glideserve.cascade import discriminator, training
from glideserve.cascade.serving import BUNDLED_DISCRIMINATORS
from glideserve.toy import scenes


def test_bundled_discriminator_report_and_format():
    folder = BUNDLED_DISCRIMINATORS / "glide-turbo"
    assert sorted(p.name for p in folder.iterdir()) == ["discriminator.json", "discriminator.safetensors"]
    report = discriminator.load(folder).report
    assert report["light_model"] == "glide-turbo"
    assert report["roc_auc"] >= 0.7 and report["held_out_images"] >= 200
    f = report["escalated_fraction_at_threshold"]
    assert f["0"] == 0.0 and f["1"] == 1.0


def test_hard_prompts_escalate_more_than_easy_ones():
    disc = discriminator.load(BUNDLED_DISCRIMINATORS / "glide-turbo")
    by_level = scenes.evaluation_captions(10, seed=5)
    captions = by_level["easy"] + by_level["hard"]
    images = training.light_images("glide-turbo", captions, seed=11, progress=False)
    confidence = disc.confidence(images)
    easy, hard = confidence[:10], confidence[10:]
    threshold = float(np.median(confidence))
    assert np.mean(hard < threshold) > np.mean(easy < threshold)
    assert hard.mean() < easy.mean()
