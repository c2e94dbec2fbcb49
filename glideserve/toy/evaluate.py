"""Prompt-adherence evaluation: generate every caption combination and judge the images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from glideserve.toy import dataset, judge


@dataclass
class AdherenceReport:
    """Accuracy per field and for all three, over ``num_images`` generated images."""

    model: str
    steps: int
    guidance: float | None
    seeds: int
    num_images: int
    accuracy: dict[str, float]
    seconds: float
    failures: list[dict] = field(default_factory=list)  # the captions the judge disagreed with
    images: list = field(default_factory=list)  # (PIL image, caption) pairs when kept

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.num_images)

    def as_dict(self) -> dict:
        return {"model": self.model, "steps": self.steps, "guidance": self.guidance, "seeds": self.seeds,
                "num_images": self.num_images, "accuracy": self.accuracy, "seconds": round(self.seconds, 3),
                "seconds_per_image": round(self.seconds_per_image, 4), "failures": self.failures}


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
    return AdherenceReport(model, steps, used_guidance, seeds, len(images), accuracy, seconds, failures, kept)
