"""Image quality of serving systems against the exact reference.

The reference for every image is diffusers' own pipeline called alone for that
request, with ``generator=torch.Generator("cpu").manual_seed(seed)`` and the same
prompt, steps, guidance and size. Each system's images are compared with it pixel
by pixel (SSIM, PSNR, largest absolute difference); toy captions are also read back
by the toy judge. CLIP score and FID need weights on local disk and are computed
only when their paths are given; otherwise the report says they were skipped.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from glideserve.bench.baselines import BASELINE_SYSTEMS, make_backend
from glideserve.bench.reference_free import ReferenceFreeMetrics
from glideserve.errors import GlideServeError
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.params import GenerationParams

ENGINE_SYSTEM = "glideserve"
SYSTEMS = (ENGINE_SYSTEM, *BASELINE_SYSTEMS)
REFERENCE = "reference"

# Generates one image per resolved request, in input order; ``progress`` shows a bar.
ImageGenerator = Callable[[list[GenerationParams], bool], list[Image.Image]]


@dataclass(frozen=True)
class QualityCase:
    """One image to compare: a prompt and a seed; ``fields`` holds the toy caption's
    ``(color, shape, background)`` when the prompt is a one-shape toy caption, for the judge;
    ``level`` the difficulty when it is a caption of the compositional task."""

    prompt: str
    seed: int
    fields: tuple[str, str, str] | None = None
    level: str | None = None


def prompt_cases(prompts: list[str], seeds: int) -> list[QualityCase]:
    """Every prompt with seeds ``0..seeds-1``."""
    if seeds < 1 or not prompts:
        raise ValueError("need at least one prompt and at least one seed")
    return [QualityCase(prompt, seed) for seed in range(seeds) for prompt in prompts]


def toy_cases(count: int, seeds: int) -> list[QualityCase]:
    """``count`` toy captions spread evenly over all caption combinations, each with seeds ``0..seeds-1``."""
    from glideserve.toy import dataset

    combos = dataset.all_combinations()
    if not 1 <= count <= len(combos) or seeds < 1:
        raise ValueError(f"the toy task has {len(combos)} distinct captions: choose 1..{len(combos)} "
                         f"(and at least one seed; use more seeds for more images), got {count}")
    picked = [combos[i * len(combos) // count] for i in range(count)]
    return [QualityCase(dataset.caption(*combo), seed, combo) for seed in range(seeds) for combo in picked]


def scene_cases(per_level: int, seeds: int) -> list[QualityCase]:
    """The compositional task's fixed sample of ``per_level`` captions per difficulty, seeds ``0..seeds-1``."""
    from glideserve.toy.evaluate import scene_cases as cases
    from glideserve.toy.scenes import parse_caption

    return [QualityCase(caption, seed, level=parse_caption(caption).difficulty)
            for caption, seed in cases(per_level, seeds)]


# -- pixel comparison ----------------------------------------------------------------------
def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a ``(1, 3, H, W)`` float tensor in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


@dataclass(frozen=True)
class ImageComparison:
    """One image against its reference: SSIM, PSNR in dB (``inf`` for identical images) and the
    largest absolute difference of any channel, in 0..255 pixel levels."""

    ssim: float
    psnr: float
    max_abs_diff: int

    @property
    def identical(self) -> bool:
        return self.max_abs_diff == 0

    def as_dict(self) -> dict:
        # JSON has no infinity: an infinite PSNR is written as null next to ``identical: true``.
        psnr = self.psnr if math.isfinite(self.psnr) else None
        return {"ssim": self.ssim, "psnr": psnr, "identical": self.identical, "max_abs_diff": self.max_abs_diff}


def compare_images(image: Image.Image, reference: Image.Image) -> ImageComparison:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if image.size != reference.size:
        raise ValueError(f"image size {image.size} differs from the reference's {reference.size}")
    got, want = to_unit_tensor(image), to_unit_tensor(reference)
    ssim = float(structural_similarity_index_measure(got, want, data_range=1.0))
    psnr = float(peak_signal_noise_ratio(got, want, data_range=1.0))
    return ImageComparison(ssim, psnr, _max_abs_diff(image, reference))


def _max_abs_diff(image: Image.Image, reference: Image.Image) -> int:
    pixels = [np.asarray(im.convert("RGB"), dtype=np.int16) for im in (image, reference)]
    return int(np.abs(pixels[0] - pixels[1]).max())


def aggregate_comparison(images: list[Image.Image], references: list[Image.Image]) -> ImageComparison:
    """Mean SSIM over the images and PSNR of the pooled squared error (torchmetrics' reductions)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    ssim, psnr = StructuralSimilarityIndexMeasure(data_range=1.0), PeakSignalNoiseRatio(data_range=1.0)
    worst = 0
    for image, reference in zip(images, references, strict=True):
        got, want = to_unit_tensor(image), to_unit_tensor(reference)
        ssim.update(got, want)
        psnr.update(got, want)
        worst = max(worst, _max_abs_diff(image, reference))
    return ImageComparison(float(ssim.compute()), float(psnr.compute()), worst)


# -- generators ----------------------------------------------------------------------------
class ReferencePipeline:
    """diffusers' own pipeline, called alone for each request: the exact reference."""

    def __init__(self, model: str, num_threads: int | None = None):
        from glideserve.models.loading import load_pipeline, serving_defaults, spec_from_pipeline
        from glideserve.runner.samplers import name_of_scheduler

        if num_threads:
            torch.set_num_threads(num_threads)
        defaults = serving_defaults(model)
        self.pipe = load_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.spec = spec_from_pipeline(self.pipe, name=str(model), defaults=defaults)
        if name_of_scheduler(self.pipe.scheduler) != self.spec.default_sampler:
            raise GlideServeError(f"{model}'s scheduler {type(self.pipe.scheduler).__name__} is not one glideserve "
                                  "runs per request, so the served images cannot match the pipeline's own")
        self.extra = {"max_sequence_length": int(defaults.get("max_sequence_length", 256))} \
            if self.spec.family == "sd3" else {}

    def resolve(self, case: QualityCase, steps: int | None, guidance: float | None,
                height: int | None, width: int | None) -> GenerationParams:
        return GenerationParams(case.prompt, num_inference_steps=steps, guidance_scale=guidance, seed=case.seed,
                                height=height, width=width).resolve(self.spec)

    def __call__(self, requests: list[GenerationParams], progress: bool = False) -> list[Image.Image]:
        images = []
        for params in tqdm(requests, desc=REFERENCE, unit="img", disable=not progress):
            with torch.inference_mode():
                images.append(self.pipe(params.prompt, negative_prompt=params.negative_prompt,
                                        num_inference_steps=params.num_inference_steps,
                                        guidance_scale=params.guidance_scale, height=params.height,
                                        width=params.width, generator=torch.Generator("cpu").manual_seed(params.seed),
                                        **self.extra).images[0])
        return images


def engine_images(model: str, requests: list[GenerationParams], progress: bool = False,
                  **config) -> list[Image.Image]:
    """Images of the step-level engine, all requests admitted at once."""
    from glideserve import Engine

    engine = Engine.from_pretrained(model, **{"max_waiting": len(requests), **config})
    return [result.image for result in engine.generate(requests, progress=progress)]


def baseline_images(system: str, model: str, requests: list[GenerationParams], progress: bool = False,
                    **config) -> list[Image.Image]:
    """Images of a baseline backend run in-process, all requests queued at once."""
    backend = make_backend(system, model, **{"max_waiting": len(requests), **config})

    async def run() -> list[Image.Image]:
        await backend.start()
        bar = tqdm(total=len(requests), desc=system, unit="img", disable=not progress)
        try:
            streams = [await backend.add_request(params) for params in requests]

            async def final(stream) -> Image.Image:
                async for event in stream:
                    if isinstance(event, RequestFailed):
                        raise GlideServeError(f"{system}: request {event.request_id} failed: {event.message}")
                    if isinstance(event, GenerationResult):
                        bar.update(1)
                        return event.image
                raise GlideServeError(f"{system}: request {stream.request_id} ended without an image")

            return list(await asyncio.gather(*(final(stream) for stream in streams)))
        finally:
            bar.close()
            await backend.shutdown(drain=False)

    return asyncio.run(run())


def system_generator(system: str, model: str, **config) -> ImageGenerator:
    """The image generator of a named system; ``config`` holds max_batch_rows / num_threads."""
    if system == ENGINE_SYSTEM:
        return lambda requests, progress=False: engine_images(model, requests, progress, **config)
    if system in BASELINE_SYSTEMS:
        return lambda requests, progress=False: baseline_images(system, model, requests, progress, **config)
    raise ValueError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")


# -- the run ---------------------------------------------------------------------------------
@dataclass
class SystemQuality:
    """Scores of one system's images (or of the reference's own, with no comparison).

    ``seconds`` is the wall time of the system's generate call, model loading included.
    """

    system: str
    num_images: int
    seconds: float
    comparison: ImageComparison | None = None
    judge: dict[str, float] | None = None
    clip_score: float | None = None
    fid: float | None = None
    images: list[dict] = field(default_factory=list)
    levels: dict[str, dict[str, float]] | None = None  # the compositional task: judge, toy CLIP, toy FID

    def as_dict(self) -> dict:
        pixel = self.comparison.as_dict() if self.comparison is not None else dict.fromkeys(
            ("ssim", "psnr", "identical", "max_abs_diff"))
        return {"system": self.system, "num_images": self.num_images,
                "seconds_with_loading": round(self.seconds, 3), **pixel,
                "judge_accuracy": self.judge, "clip_score": self.clip_score, "fid": self.fid,
                "levels": self.levels, "images": self.images}


@dataclass
class QualityReport:
    """The reference's scores, every system's scores against it, and why any metric was skipped."""

    model: str
    settings: dict
    reference: SystemQuality
    systems: list[SystemQuality]
    notes: dict[str, str]

    def as_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings, "notes": self.notes,
                "reference": self.reference.as_dict(), "systems": [s.as_dict() for s in self.systems]}


def _judge(images: list[Image.Image], cases: list[QualityCase]) -> tuple[dict | None, list[dict | None]]:
    if any(case.fields is None for case in cases):
        return None, [None] * len(cases)
    from glideserve.toy import judge

    verdicts = [judge.judge_image(np.asarray(image.convert("RGB"))) for image in images]
    reads = [{"read": [v.color, v.shape, v.background], "correct": all(v.matches(*c.fields).values())}
             for v, c in zip(verdicts, cases)]
    return judge.accuracy(verdicts, [case.fields for case in cases]), reads


def _levels(images: list[Image.Image], cases: list[QualityCase], toy_clip) -> dict | None:
    if not cases or any(case.level is None for case in cases):
        return None
    from glideserve.toy.evaluate import score_scene_images

    return score_scene_images([np.asarray(image.convert("RGB")) for image in images], [c.prompt for c in cases],
                              toy_clip)


def _score(system: str, images: list[Image.Image], seconds: float, cases: list[QualityCase],
           metrics: ReferenceFreeMetrics, references: list[Image.Image] | None, toy_clip=None) -> SystemQuality:
    judge_accuracy, reads = _judge(images, cases)
    records = []
    for i, (image, case) in enumerate(zip(images, cases)):
        record = {"index": i, "prompt": case.prompt, "seed": case.seed}
        if references is not None:
            record.update(compare_images(image, references[i]).as_dict())
        if reads[i] is not None:
            record["judge"] = reads[i]
        records.append(record)
    return SystemQuality(
        system, len(images), seconds,
        comparison=aggregate_comparison(images, references) if references is not None else None,
        judge=judge_accuracy, clip_score=metrics.clip_score(images, [c.prompt for c in cases]),
        fid=metrics.fid(images) if references is not None else None, images=records,
        levels=_levels(images, cases, toy_clip))


def _save(folder: Path, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png")


def run_quality(model: str, cases: list[QualityCase], systems: dict[str, ImageGenerator], *,
                steps: int | None = None, guidance: float | None = None, size: tuple[int, int] | None = None,
                metrics: ReferenceFreeMetrics | None = None, out_dir: Path | None = None,
                progress: bool = True, num_threads: int | None = None, toy_clip=None) -> QualityReport:
    """Generate ``cases`` with the reference and each system, and score every system against it.

    ``size`` is ``(height, width)``; ``None`` settings take the model's defaults. Every
    system receives the same fully resolved requests (seed, steps, guidance, size). Captions of the
    compositional task are scored per difficulty (judge, and with ``toy_clip`` the toy CLIP score
    and FID).
    """
    if not cases or not systems:
        raise ValueError("need at least one case and one system")
    metrics = metrics or ReferenceFreeMetrics()
    reference = ReferencePipeline(model, num_threads)
    height, width = size if size is not None else (None, None)
    requests = [reference.resolve(case, steps, guidance, height, width) for case in cases]
    if cases[0].fields is not None and requests[0].height != requests[0].width:
        raise GlideServeError("the toy judge reads square images: choose a square size for toy captions")
    start = time.perf_counter()
    reference_images = reference(requests, progress)
    scored_reference = _score(REFERENCE, reference_images, time.perf_counter() - start, cases, metrics, None,
                              toy_clip)
    del reference  # one pipeline in memory at a time
    metrics.set_reference(reference_images)
    if out_dir is not None:
        _save(out_dir / REFERENCE, reference_images)
    scored = []
    for name, generate in systems.items():
        start = time.perf_counter()
        images = generate(requests, progress)
        seconds = time.perf_counter() - start
        if len(images) != len(requests):
            raise GlideServeError(f"{name} returned {len(images)} images for {len(requests)} requests")
        scored.append(_score(name, images, seconds, cases, metrics, reference_images, toy_clip))
        if out_dir is not None:
            _save(out_dir / name, images)
    first = requests[0]
    settings = {"steps": first.num_inference_steps, "guidance": first.guidance_scale, "height": first.height,
                "width": first.width, "sampler": first.sampler, "num_cases": len(cases)}
    return QualityReport(str(model), settings, scored_reference, scored, dict(metrics.notes))
