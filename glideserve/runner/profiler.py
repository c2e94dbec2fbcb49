"""The start-up sweep that fills a latency profile, measured through the runner itself.

It drives the real ``ModelRunner`` with synthetic requests (one row each, no
guidance, so any row count can be formed), exactly the code path that serves: the
prefill of ``n`` new requests, a denoising step of ``rows`` rows at each size (forward
plus sampler updates), and a batched VAE decode of ``n`` images. Each point is the
fastest of a few timed repeats after one warm-up: other processes only ever add time,
so the minimum is the cost of the work itself; the online updates then follow the load
the machine really has.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from glideserve.config import SchedulerConfig
from glideserve.models.spec import ModelSpec
from glideserve.params import GenerationParams
from glideserve.runner.runner import ModelRunner
from glideserve.scheduler.output import NewRequestData, SchedulerOutput
from glideserve.scheduler.profile import LatencyProfile, PiecewiseLinear

REPEATS = 3


def row_counts(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to ``max_rows``, with ``max_rows`` itself."""
    counts, r = [], 1
    while r < max_rows:
        counts.append(r)
        r *= 2
    return counts + [max_rows]


def _fastest(measure: Callable[[], float], repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``measure`` (which returns seconds), after one warm-up call."""
    measure()  # the first call at a new shape pays for allocations
    return min(measure() for _ in range(repeats))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_size(runner: ModelRunner, spec: ModelSpec, height: int, width: int, config: SchedulerConfig,
                 repeats: int = REPEATS, progress: Callable[[str], None] = lambda _: None) -> LatencyProfile:
    """Profile one image size: denoising steps at 1..max rows, prefill and decode batches."""
    tokens = spec.tokens_per_row(height, width)
    max_rows = max(1, min(config.max_batch_rows, config.max_latent_tokens // tokens))
    counts = row_counts(max_rows)
    steps = len(counts) * (repeats + 1) + 1  # the first request takes part in every measurement
    ids = [f"profile-{height}x{width}-{i}" for i in range(max_rows)]

    def make_params(tag: str, i: int) -> GenerationParams:
        return GenerationParams(f"profile prompt {height}x{width} {tag} {i}", num_inference_steps=steps,
                                guidance_scale=1.0, seed=i, height=height, width=width).resolve(spec)

    params = [make_params("step", i) for i in range(max_rows)]
    profile = LatencyProfile()
    try:
        def prefill_s(n: int, trial: int) -> float:
            """Prefill ``n`` requests with prompts never seen before.

            A prompt the encoder's LRU holds costs almost nothing, a new one costs a text
            encoder call (on ``glide-small`` several denoising steps' worth). How often
            prompts repeat depends on the workload, so the profile starts from the cost of
            new prompts, the safe side for deadlines, and the online updates, which see
            every real prefill, learn the mix.
            """
            batch = tuple(NewRequestData(f"profile-prefill-{trial}-{i}", make_params(f"prefill {trial}", i))
                          for i in range(n))
            seconds = _timed(lambda: runner.execute(SchedulerOutput(new_requests=batch)))
            runner.execute(SchedulerOutput(freed=tuple(d.request_id for d in batch)))
            return seconds

        progress(f"{height}x{width}: prefill")
        runner.encoder.encode([(f"profile warm-up {height}x{width}", ())])  # the text encoders' first call is slow
        trials = iter(range(10**6))
        prefill = {n: _fastest(lambda: prefill_s(n, next(trials)), repeats)
                   for n in sorted({1, max(1, max_rows - 1)})}
        runner.execute(SchedulerOutput(new_requests=tuple(NewRequestData(i, p) for i, p in zip(ids, params))))
        profile.prefill = PiecewiseLinear(prefill)
        points = {}
        for rows in counts:
            progress(f"{height}x{width}: step of {rows} row(s)")
            plan = SchedulerOutput(scheduled=tuple(ids[:rows]))
            points[rows] = _fastest(lambda: runner.execute(plan).timing.groups[0].seconds, repeats)
        profile.steps[tokens] = PiecewiseLinear(points)
        decode = {}
        latent = torch.randn(max(counts), *spec.latent_shape(height, width), generator=torch.Generator().manual_seed(0))
        latent = latent.to(runner.family.device, runner.family.dtype)
        for n in sorted({1, min(config.max_decode_batch, max(counts))}):
            progress(f"{height}x{width}: decode of {n} image(s)")
            with torch.inference_mode():
                decode[n] = _fastest(lambda: _timed(lambda: runner.family.decode(latent[:n])), repeats)
        profile.decode[tokens] = PiecewiseLinear(decode)
    finally:
        runner.execute(SchedulerOutput(freed=tuple(ids)))
        runner.encoder.clear()
    return profile
