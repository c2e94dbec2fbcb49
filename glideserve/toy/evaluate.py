"""Prompt-adherence evaluation: generate every caption combination and judge the images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from glideserve.toy import dataset, judge


@dataclass
class EvaluationRun:
    """What every evaluation reports about its run: the model, its settings, the images and the time."""

    model: str
    steps: int
    guidance: float | None
    seeds: int
    num_images: int
    seconds: float

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.num_images)

    def as_dict(self) -> dict:
        return {"model": self.model, "steps": self.steps, "guidance": self.guidance, "seeds": self.seeds,
                "num_images": self.num_images, "seconds": round(self.seconds, 3),
                "seconds_per_image": round(self.seconds_per_image, 4)}


@dataclass
class AdherenceReport(EvaluationRun):
    """Accuracy per field and for all three, over ``num_images`` generated images."""

    accuracy: dict[str, float] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # the captions the judge disagreed with
    images: list = field(default_factory=list)  # (PIL image, caption) pairs when kept

    def as_dict(self) -> dict:
        return {**super().as_dict(), "accuracy": self.accuracy, "failures": self.failures}


def evaluation_cases(seeds: int, combinations: list[tuple[str, str, str]] | None = None) -> list[tuple[tuple[str, str, str], int]]:
    """Every caption combination (all 168 by default) paired with seeds ``0..seeds-1``."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    combos = dataset.all_combinations() if combinations is None else combinations
    return [(combo, seed) for seed in range(seeds) for combo in combos]


def score_images(images: list[np.ndarray], combos: list[tuple[str, str, str]]) -> tuple[dict[str, float], list[dict]]:
    """Judge each image against its caption fields; returns accuracies and the mismatches."""
    verdicts = [judge.judge_image(image) for image in images]
    failures = [{"caption": dataset.caption(*combo), "read": [v.color, v.shape, v.background]}
                for v, combo in zip(verdicts, combos) if not all(v.matches(*combo).values())]
    return judge.accuracy(verdicts, combos), failures


def evaluate_engine(model: str, *, steps: int, seeds: int, guidance: float | None = None,
                    combinations: list[tuple[str, str, str]] | None = None, progress: bool = True,
                    keep_images: bool = False, **engine_config) -> AdherenceReport:
    """Generate every case through :class:`glideserve.Engine` and judge the images."""
    from glideserve import Engine, GenerationParams

    cases = evaluation_cases(seeds, combinations)
    # The whole evaluation is submitted at once, so the waiting queue must hold all of it.
    engine = Engine.from_pretrained(model, **{"max_waiting": len(cases), **engine_config})
    requests = [GenerationParams(prompt=dataset.caption(*combo), num_inference_steps=steps, guidance_scale=guidance,
                                 seed=seed, height=dataset.IMAGE_SIZE, width=dataset.IMAGE_SIZE)
                for combo, seed in cases]
    start = time.perf_counter()
    results = engine.generate(requests, progress=progress)
    seconds = time.perf_counter() - start
    images = [np.asarray(result.image.convert("RGB")) for result in results]
    accuracy, failures = score_images(images, [combo for combo, _ in cases])
    used_guidance = results[0].params.guidance_scale if results else guidance
    kept = [(r.image, dataset.caption(*combo)) for r, (combo, _) in zip(results, cases)] if keep_images else []
    return AdherenceReport(model, steps, used_guidance, seeds, len(images), seconds, accuracy=accuracy,
                           failures=failures, images=kept)


# -- the compositional task ---------------------------------------------------------------
def scene_cases(per_level: int, seeds: int, sample_seed: int = 0) -> list[tuple[str, int]]:
    """``(caption, seed)`` pairs: a fixed sample of ``per_level`` captions of each difficulty, seeds ``0..seeds-1``."""
    if seeds < 1 or per_level < 1:
        raise ValueError(f"need at least one caption per level and one seed, got {per_level} and {seeds}")
    from glideserve.toy import scenes

    captions = [c for level in scenes.evaluation_captions(per_level, sample_seed).values() for c in level]
    return [(caption, seed) for seed in range(seeds) for caption in captions]


def score_scene_images(images: list[np.ndarray], captions: list[str], toy_clip=None,
                       fid_seed: int = 0) -> dict[str, dict[str, float]]:
    """Per difficulty level (and overall): the judge's per-skill accuracy and ``all``, and with the
    toy CLIP (``toy_clip``, see ``glideserve.toy.contrastive``) its CLIP score and FID against dataset
    images of the same captions."""
    from glideserve.toy import contrastive, scene_judge, scenes

    summary = scene_judge.summarize(captions, [scene_judge.score(im, c) for im, c in zip(images, captions)])
    if toy_clip is None:
        return summary
    levels = [scenes.parse_caption(c).difficulty for c in captions]
    stack = np.stack(images)
    for level in summary:
        pick = [i for i, lv in enumerate(levels) if level == "overall" or lv == level]
        chosen = [captions[i] for i in pick]
        summary[level]["toy_clip_score"] = float(toy_clip.score(stack[pick], chosen).mean())
        if len(pick) >= 2:
            reference = contrastive.reference_images(chosen, fid_seed)
            summary[level]["toy_fid"] = contrastive.toy_fid(toy_clip, stack[pick], reference)
    return summary


@dataclass
class SceneReport(EvaluationRun):
    """Judge, toy CLIP score and toy FID per difficulty level for one model and step count."""

    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    images: list = field(default_factory=list)  # (PIL image, caption) pairs when kept

    def as_dict(self) -> dict:
        return {**super().as_dict(), "levels": self.levels}


def evaluate_scenes(model: str, *, steps: int | None, seeds: int, per_level: int, guidance: float | None = None,
                    progress: bool = True, keep_images: bool = False, toy_clip=None,
                    **engine_config) -> SceneReport:
    """Generate the fixed caption sample of each difficulty through :class:`glideserve.Engine` and score it."""
    from glideserve import Engine, GenerationParams

    cases = scene_cases(per_level, seeds)
    engine = Engine.from_pretrained(model, **{"max_waiting": len(cases), **engine_config})
    requests = [GenerationParams(prompt=caption, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                 height=dataset.IMAGE_SIZE, width=dataset.IMAGE_SIZE) for caption, seed in cases]
    start = time.perf_counter()
    results = engine.generate(requests, progress=progress)
    seconds = time.perf_counter() - start
    images = [np.asarray(r.image.convert("RGB")) for r in results]
    captions = [caption for caption, _ in cases]
    levels = score_scene_images(images, captions, toy_clip)
    first = results[0].params
    kept = [(r.image, c) for r, c in zip(results, captions)] if keep_images else []
    return SceneReport(model, first.num_inference_steps, first.guidance_scale, seeds, len(images), seconds,
                       levels=levels, images=kept)


def model_footprint(model: str) -> dict[str, int]:
    """Parameters (all components, and the transformer's) and bytes on disk of a model folder's weights."""
    from safetensors import safe_open

    from glideserve.models.loading import resolve_model_path

    folder = resolve_model_path(model)
    out = {"parameters": 0, "transformer_parameters": 0, "disk_bytes": 0}
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            count = sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())
        out["parameters"] += count
        out["transformer_parameters"] += count if file.parent.name == "transformer" else 0
    out["disk_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return out


@dataclass
class AutoencoderReport:
    """The judge on a model's own VAE round trips (encode, then decode) of dataset scenes, per level:
    the ceiling of any transformer that decodes through that VAE."""

    model: str
    levels: dict[str, dict[str, float]]
    mean_abs_error: float  # 0..255 scale, over every image

    def as_dict(self) -> dict:
        return {"model": self.model, "levels": self.levels, "mean_abs_error": round(self.mean_abs_error, 3)}


@torch.no_grad()
def evaluate_autoencoder(model: str, per_level: int, seed: int = 12345) -> AutoencoderReport:
    """Round-trip ``per_level`` fresh scenes of each difficulty through the model's VAE and judge them."""
    from glideserve.models.loading import resolve_model_path
    from glideserve.toy import scene_judge, scenes
    from glideserve.toy.train import load_vae_from

    if per_level < 1:
        raise ValueError(f"need at least one scene per level, got {per_level}")
    vae = load_vae_from(resolve_model_path(model))
    drawn = [s for i, level in enumerate(scenes.DIFFICULTIES)
             for s in scenes.sample_scenes(per_level, seed + i, mix={level: 1.0})]
    originals = np.stack([scenes.render_scene(s) for s in drawn])
    images = dataset.to_model_range(originals)
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in images.split(64)])
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    captions = [s.caption for s in drawn]
    levels = scene_judge.summarize(captions, [scene_judge.score(p, c) for p, c in zip(pixels, captions)])
    error = float(np.abs(pixels.astype(np.float32) - originals.astype(np.float32)).mean())
    return AutoencoderReport(model, levels, error)
