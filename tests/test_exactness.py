"""Every image the step-level engine produces equals diffusers' own pipeline run alone.

Requests differ in prompt, seed, steps, guidance, sampler and size, and join while
others are mid-way; each result is compared with ``Pipeline.__call__`` for that
request alone with ``torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

from glideserve import Engine, GenerationParams, GenerationResult

# Independent of the engine's own registry on purpose: the test states what each name means.
SAMPLER_CLASSES = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a green triangle", "an astronaut on the moon",
           "a yellow square on a black background", "oil painting of a lake", "a purple circle", "city at night"]
MAX_SEQ = 16


def _requests(samplers, sizes):
    """8 requests: steps 4..12, guidance with and without CFG, arrival steps staggered."""
    steps = [4, 12, 7, 5, 10, 6, 9, 8]
    guidance = [4.5, 1.0, 7.0, 3.0, 1.0, 5.5, 2.0, 6.0]
    arrivals = [0, 0, 1, 2, 3, 5, 7, 9]
    reqs = []
    for i in range(8):
        h, w = sizes[i % len(sizes)]
        reqs.append((arrivals[i], GenerationParams(
            PROMPTS[i], negative_prompt="blurry" if i == 3 else None, num_inference_steps=steps[i],
            guidance_scale=guidance[i], seed=1000 + 17 * i, height=h, width=w,
            sampler=samplers[i % len(samplers)], request_id=f"r{i}")))
    return reqs


def _run_staggered(engine: Engine, reqs) -> dict[str, GenerationResult]:
    results, step = {}, 0
    pending = list(reqs)
    while pending or engine.has_unfinished():
        for arrival, params in [r for r in pending if r[0] <= step]:
            engine.add_request(params)
            pending.remove((arrival, params))
        for event in engine.step():
            if isinstance(event, GenerationResult):
                results[event.request_id] = event
        step += 1
    return results


def _reference(pipe, params: GenerationParams, family: str):
    cls, overrides = SAMPLER_CLASSES[params.sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    kwargs = {"max_sequence_length": MAX_SEQ} if family == "sd3" else {}
    return pipe(params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale, height=params.height, width=params.width,
                generator=torch.Generator("cpu").manual_seed(params.seed), **kwargs).images[0]


def _check_all(model_dir, family, samplers, sizes, **engine_kwargs):
    engine = Engine.from_pretrained(model_dir, max_sequence_length=MAX_SEQ, **engine_kwargs)
    reqs = _requests(samplers, sizes)
    results = _run_staggered(engine, reqs)
    assert sorted(results) == sorted(p.request_id for _, p in reqs)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for _, params in reqs:
        got = np.asarray(results[params.request_id].image).astype(int)
        want = np.asarray(_reference(pipe, params, family)).astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2, f"{params.request_id} differs from the pipeline"
    return results


@pytest.mark.parametrize("budget", [{}, {"max_batch_rows": 5}], ids=["roomy", "tight-budget"])
def test_sd3_matches_pipeline_with_staggered_arrivals(tiny_sd3_dir, budget):
    results = _check_all(tiny_sd3_dir, "sd3", ["flow_euler"], [(32, 32), (24, 32)], **budget)
    if budget:  # with 5 rows some requests had to wait for others to leave
        assert max(r.timings.queued_s for r in results.values()) > 0


def test_sd15_matches_pipeline_with_mixed_samplers(tiny_sd15_dir):
    _check_all(tiny_sd15_dir, "sd15", ["ddim", "euler", "euler_a", "dpmpp_2m"], [(32, 32), (16, 32)])


def test_sdxl_matches_pipeline(tiny_sdxl_dir):
    _check_all(tiny_sdxl_dir, "sdxl", ["euler", "dpmpp_2m", "ddim"], [(32, 32)], max_batch_rows=6)


def test_seed_reproduces_and_differs(tiny_sd3_dir):
    results = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=MAX_SEQ).generate(
        [GenerationParams("a cat", num_inference_steps=3, seed=5)])
    assert results[0].params.seed == 5 and results[0].timings.steps == 3
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=MAX_SEQ)
    a, b, c = (np.asarray(r.image).astype(int) for r in engine.generate(
        [GenerationParams("a cat", num_inference_steps=3, seed=s) for s in (5, 5, 6)]))
    # Same seed in two rows of one batch: equal up to float rounding of the batched matmuls.
    assert np.abs(a - b).max() <= 2
    assert np.abs(a - c).mean() > 5


def test_spec_limits_sizes_to_the_position_table(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=MAX_SEQ)
    assert engine.spec.max_side == 64 * 2 * 2  # pos_embed_max_size x patch x VAE factor


def test_sd3_compiled_matches_pipeline(tiny_sd3_dir):
    """Compiled blocks (inductor) at padded row buckets: every image within 2/255 of diffusers' eager pipeline."""
    results = _check_all(tiny_sd3_dir, "sd3", ["flow_euler"], [(32, 32), (24, 32)], compile=True,
                         compile_buckets=(4, 16), profile_sizes=((32, 32), (32, 24)))
    assert len(results) == 8


def test_sdxl_compiled_matches_pipeline(tiny_sdxl_dir):
    _check_all(tiny_sdxl_dir, "sdxl", ["euler", "ddim"], [(32, 32)], max_batch_rows=6, compile=True,
               compile_buckets=(6,))
