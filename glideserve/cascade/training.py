"""Training a cascade's discriminator for a light model on the bundled compositional task.

Real images are fresh renders of the task's scenes; generated ones are the light model's
answers to the same captions, served through :class:`glideserve.Engine` at its default steps
(what the cascade will score). A held-out fifth of both measures the discriminator: accuracy,
ROC-AUC, the profile f(t) measured from the light images' confidences, and per difficulty level
the mean confidence and the share escalated at a few thresholds.
"""

from __future__ import annotations

import time

import numpy as np

from glideserve.cascade import discriminator as disc_mod
from glideserve.cascade.profiles import EscalationProfile

REPORT_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)


def task_captions(count: int, seed: int) -> list[str]:
    """``count`` captions drawn evenly over the difficulty levels (deterministic for a seed)."""
    from glideserve.toy import scenes

    share = 1.0 / len(scenes.DIFFICULTIES)
    return [spec.caption for spec in scenes.sample_specs(count, seed, mix={lv: share for lv in scenes.DIFFICULTIES})]


def real_images(captions: list[str], seed: int) -> list[np.ndarray]:
    from glideserve.toy import scenes

    rng = np.random.default_rng(seed)
    return [scenes.render_scene(scenes.draw_scene(scenes.parse_caption(c), rng)) for c in captions]


def light_images(model: str, captions: list[str], seed: int, steps: int | None = None,
                 progress: bool = True) -> list[np.ndarray]:
    from glideserve import Engine, GenerationParams
    from glideserve.toy import dataset

    engine = Engine.from_pretrained(model, max_waiting=len(captions))
    requests = [GenerationParams(prompt=c, num_inference_steps=steps, seed=seed + i, height=dataset.IMAGE_SIZE,
                                 width=dataset.IMAGE_SIZE) for i, c in enumerate(captions)]
    return [np.asarray(r.image.convert("RGB")) for r in engine.generate(requests, progress=progress)]


def evaluate(disc: disc_mod.Discriminator, real: list, generated: list, captions: list[str]) -> dict:
    """Held-out accuracy (at 0.5), ROC-AUC, f(t) over the generated images, and per-level escalation."""
    from glideserve.toy import scenes

    real_scores = disc.confidence(real)
    fake_scores = disc.confidence(generated)
    accuracy = (np.sum(real_scores >= 0.5) + np.sum(fake_scores < 0.5)) / (len(real_scores) + len(fake_scores))
    f = EscalationProfile.from_scores(fake_scores, points=201)  # DiffServe's grid: the useful thresholds may all be small
    levels = {}
    difficulty = np.array([scenes.parse_caption(c).difficulty for c in captions])
    for level in scenes.DIFFICULTIES:
        chosen = fake_scores[difficulty == level]
        if len(chosen):
            levels[level] = {"images": int(len(chosen)), "mean_confidence": round(float(chosen.mean()), 4),
                             **{f"escalated@{t:g}": round(float(np.mean(chosen < t)), 4) for t in REPORT_THRESHOLDS}}
    return {"held_out_images": int(len(real_scores) + len(fake_scores)), "accuracy": round(float(accuracy), 4),
            "roc_auc": round(disc_mod.roc_auc(real_scores, fake_scores), 4),
            "escalated_fraction_at_threshold": {k: round(v, 4) for k, v in f.as_dict().items()},
            "levels": levels}


def train_for_light_model(light: str, *, images: int, steps: int, seed: int = 0, kind: str = "small-cnn",
                          encoder_path: str | None = None, light_steps: int | None = None,
                          progress: bool = True) -> disc_mod.Discriminator:
    """Generate ``images`` light images (and as many real ones), train on 80%, report on the rest."""
    if images < 10:
        raise ValueError(f"need at least 10 images to train and hold some out, got {images}")
    captions = task_captions(images, seed)
    start = time.perf_counter()
    generated = light_images(light, captions, seed, light_steps, progress)
    generation_s = time.perf_counter() - start
    real = real_images(captions, seed + 1)
    cut = int(len(captions) * 0.8)
    disc = disc_mod.build(kind, encoder_path)
    start = time.perf_counter()
    disc_mod.train(disc, real[:cut], generated[:cut], steps=steps, seed=seed, progress=progress)
    disc.report = {"light_model": light, "train_images": 2 * cut, "train_steps": steps,
                   "generation_seconds": round(generation_s, 1),
                   "training_seconds": round(time.perf_counter() - start, 1),
                   **evaluate(disc, real[cut:], generated[cut:], captions[cut:])}
    return disc
