"""Step-caching policies side by side, on one engine: FLOPs, time, fidelity to ``none``, the judge.

For each step count and each configuration (a cache policy, with or without
latent-aware denoising) over the same toy captions and seeds:

- transformer FLOPs per image, counted by torch's ``FlopCounterMode`` around the
  denoiser's forwards only (text encoders and VAE excluded), over the first
  ``flop_images`` requests, each alone: threshold policies decide per image, so the
  count is a mean over real images, not an estimate;
- wall seconds per image alone (the first ``alone`` requests one at a time) and at
  ``inflight`` requests in flight (every case submitted at once, batched step by step);
- SSIM and PSNR of every image against the ``none`` image with the same seed, and the
  toy judge's accuracy;
- the mean number of full and cached steps per image.

Every configuration runs on the same engine (the policy and latent-aware flag travel
per request), so timings compare within one run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from glideserve.bench.quality import QualityCase, _judge, aggregate_comparison
from glideserve.engine.engine import Engine
from glideserve.outputs import GenerationResult
from glideserve.params import GenerationParams

DEFAULT_POLICIES = ("none", "glideserve:2", "glideserve:5", "fora:2", "fora:5", "taylorseer:3", "teacache:0.3",
                    "teacache:0.6", "fbcache:0.1", "fbcache:0.2")


@dataclass(frozen=True)
class CacheConfig:
    """One row of the table: a cache policy and whether latent-aware denoising is on."""

    policy: str
    latent_aware: bool = False

    @property
    def label(self) -> str:
        return self.policy + (" +latent-aware" if self.latent_aware else "")


@dataclass
class CacheRow:
    """Measurements of one configuration at one step count."""

    config: CacheConfig
    steps: int
    images: int
    transformer_gflops: float
    alone_s: float
    inflight_s: float
    ssim: float
    psnr: float
    judge_all: float | None
    full_steps: float
    cached_steps: float

    def as_dict(self) -> dict:
        # JSON has no infinity: an exact row's infinite PSNR is written as null, as in `eval quality`.
        psnr = self.psnr if math.isfinite(self.psnr) else None
        return {"policy": self.config.policy, "latent_aware": self.config.latent_aware, "steps": self.steps,
                "images": self.images, "transformer_gflops_per_image": self.transformer_gflops,
                "alone_s_per_image": self.alone_s, "inflight_s_per_image": self.inflight_s, "ssim": self.ssim,
                "psnr": psnr, "judge_all": self.judge_all, "full_steps": self.full_steps,
                "cached_steps": self.cached_steps}


class DenoiserFlopCounter:
    """Counts FLOPs of the runner's denoiser forwards while ``active`` (torch's FlopCounterMode
    clears its counts on entry, so each forward gets its own and they are summed)."""

    def __init__(self, engine: Engine):
        self.family = engine.core.runner.family
        self.total = 0.0
        self.active = False
        self._denoise = self.family.denoise
        self.family.denoise = self._counted  # instance attribute: this engine only

    def _counted(self, *args, **kwargs):
        if not self.active:
            return self._denoise(*args, **kwargs)
        counter = FlopCounterMode(display=False)
        with counter:
            out = self._denoise(*args, **kwargs)
        self.total += counter.get_total_flops()
        return out


def _params(cases: list[QualityCase], config: CacheConfig, steps: int, tag: str) -> list[GenerationParams]:
    return [GenerationParams(c.prompt, seed=c.seed, num_inference_steps=steps, cache=config.policy,
                             latent_aware=config.latent_aware, request_id=f"{tag}-{i}") for i, c in enumerate(cases)]


def _run(engine: Engine, params: list[GenerationParams]) -> tuple[list[GenerationResult], float]:
    start = time.perf_counter()
    results = engine.generate(params)
    return results, time.perf_counter() - start


def measure_config(engine: Engine, counter: DenoiserFlopCounter, config: CacheConfig, steps: int,
                   cases: list[QualityCase], reference: list[Image.Image] | None, *, alone: int,
                   flop_images: int) -> tuple[CacheRow, list[Image.Image]]:
    """One configuration at one step count; ``reference`` (the ``none`` images) None measures ``none`` itself."""
    tag = f"{config.label}-{steps}"
    counter.active, counter.total = True, 0.0
    for i, p in enumerate(_params(cases[:flop_images], config, steps, tag + "-flops")):
        _run(engine, [p])
    counter.active = False
    gflops = counter.total / max(1, min(flop_images, len(cases))) / 1e9
    alone_times = [_run(engine, [p])[1] for p in _params(cases[:alone], config, steps, tag + "-alone")]
    results, seconds = _run(engine, _params(cases, config, steps, tag))
    images = [r.image for r in results]
    comparison = aggregate_comparison(images, reference if reference is not None else images)
    judge, _ = _judge(images, cases)
    row = CacheRow(config, steps, len(images), gflops, sum(alone_times) / max(1, len(alone_times)),
                   seconds / len(images), comparison.ssim, comparison.psnr, None if judge is None else judge["all"],
                   sum(r.timings.full_steps for r in results) / len(results),
                   sum(r.timings.cached_steps for r in results) / len(results))
    return row, images


def run_caching_table(model: str, steps_list: list[int], configs: list[CacheConfig], cases: list[QualityCase], *,
                      inflight: int = 8, alone: int = 4, flop_images: int = 4, num_threads: int | None = None,
                      on_row=None) -> tuple[list[CacheRow], dict[tuple[str, int], list[Image.Image]]]:
    """Every configuration at every step count; ``none`` (no latent-aware) is measured first as the reference."""
    if num_threads:
        torch.set_num_threads(num_threads)
    engine = Engine.from_pretrained(model, max_batch_rows=2 * inflight, max_waiting=max(256, len(cases)),
                                    policy="fcfs", cache_memory_mb=4096)
    counter = DenoiserFlopCounter(engine)
    exact = CacheConfig("none")
    ordered = [exact, *(c for c in configs if c != exact)]
    rows, images = [], {}
    for steps in steps_list:
        reference = None
        for config in ordered:
            row, got = measure_config(engine, counter, config, steps, cases, reference, alone=alone,
                                      flop_images=flop_images)
            if config == exact:
                reference = got
            rows.append(row)
            images[(config.label, steps)] = got
            if on_row is not None:
                on_row(row)
    return rows, images


def markdown_table(rows: list[CacheRow]) -> str:
    """One table: a row per configuration and step count, ratios against ``none`` at the same steps."""
    base = {r.steps: r for r in rows if r.config == CacheConfig("none")}
    lines = ["| steps | policy | latent-aware | transformer GFLOPs/img | FLOPs cut | full / cached steps | "
             "s/img alone | speed-up alone | s/img at 8 in flight | speed-up in flight | SSIM | PSNR (dB) | judge |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r.steps, r)
        judge = "n/a" if r.judge_all is None else f"{r.judge_all:.3f}"
        psnr = "exact" if r.psnr == float("inf") else f"{r.psnr:.1f}"
        lines.append(
            f"| {r.steps} | {r.config.policy} | {'yes' if r.config.latent_aware else 'no'} | "
            f"{r.transformer_gflops:.2f} | {b.transformer_gflops / r.transformer_gflops:.2f}x | "
            f"{r.full_steps:.1f} / {r.cached_steps:.1f} | {r.alone_s:.3f} | {b.alone_s / r.alone_s:.2f}x | "
            f"{r.inflight_s:.3f} | {b.inflight_s / r.inflight_s:.2f}x | {r.ssim:.3f} | {psnr} | {judge} |")
    return "\n".join(lines)
