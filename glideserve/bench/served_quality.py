"""Quality of the images a load run served: the toy judge, and SSIM against the exact engine.

A speed-up counts only if its images are right. After a load run that kept its images,
each served image is read by the toy judge (when its prompt is a toy caption) and
compared (SSIM) with the image the exact engine (``cache: none``) makes for the same
prompt, seed, steps and size, run in this process after the servers have stopped.
"""

from __future__ import annotations

import io

from PIL import Image

from glideserve.bench.records import ON_TIME, RequestRecord


class ExactReferences:
    """The exact engine's image for each (prompt, seed, steps, size), generated once and kept."""

    def __init__(self, model: str):
        from glideserve.engine.engine import Engine

        self.engine = Engine.from_pretrained(model, policy="fcfs", max_waiting=100_000)
        self._images: dict[tuple, Image.Image] = {}

    def fill(self, keys: list[tuple]) -> None:
        from glideserve.params import GenerationParams, parse_size

        missing = [k for k in dict.fromkeys(keys) if k not in self._images]
        params = []
        for prompt, seed, steps, size in missing:
            height, width = parse_size(size) if size else (None, None)
            params.append(GenerationParams(prompt, seed=seed, num_inference_steps=steps, height=height, width=width,
                                           cache="none", latent_aware=False))
        for key, result in zip(missing, self.engine.generate(params)):
            self._images[key] = result.image

    def __getitem__(self, key: tuple) -> Image.Image:
        return self._images[key]


def _key(record: RequestRecord) -> tuple:
    return (record.prompt, record.seed, record.steps, record.size)


def score_served_images(records: list[RequestRecord], references: ExactReferences) -> None:
    """Fill ``judge_correct`` and ``ssim`` of every record that kept an image."""
    import numpy as np

    from glideserve.bench.quality import compare_images
    from glideserve.toy import dataset, judge

    fields = {dataset.caption(*combo): combo for combo in dataset.all_combinations()}
    served = [r for r in records if r.image is not None]
    references.fill([_key(r) for r in served])
    for r in served:
        image = Image.open(io.BytesIO(r.image)).convert("RGB")
        r.ssim = compare_images(image, references[_key(r)]).ssim
        combo = fields.get(r.prompt)
        if combo is not None:
            r.judge_correct = all(judge.judge_image(np.asarray(image)).matches(*combo).values())


def quality_figures(records: list[RequestRecord], wall_s: float) -> dict:
    """Correct-and-on-time goodput, judge accuracy and mean SSIM of served images, cached-step share."""
    served = [r for r in records if r.ssim is not None]
    judged = [r for r in served if r.judge_correct is not None]
    good = [r for r in records if r.status == ON_TIME and r.judge_correct is not False and r.ssim is not None]
    steps = [(r.full_steps, r.cached_steps) for r in records if r.full_steps is not None and r.cached_steps is not None]
    total_steps = sum(f + c for f, c in steps)
    return {
        "scored_images": len(served),
        "correct_on_time": len(good),
        "correct_goodput_img_per_min": 60.0 * len(good) / wall_s if wall_s > 0 else None,
        "judge_accuracy_served": sum(r.judge_correct for r in judged) / len(judged) if judged else None,
        "mean_ssim_vs_exact": sum(r.ssim for r in served) / len(served) if served else None,
        "min_ssim_vs_exact": min((r.ssim for r in served), default=None),
        "cached_step_share": sum(c for _, c in steps) / total_steps if total_steps else None,
    }
