"""Baseline backends reproduce the diffusers pipeline and honour the backend contract."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from glideserve.bench.baselines import BaselineConfig, make_backend
from glideserve.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from glideserve.outputs import GenerationResult, Queued, RequestFailed, StepProgress
from glideserve.params import GenerationParams

STEPS = 3
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background"]


def _pipeline_images(model_dir, cls_name, prompts, seeds, **call):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return [pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                 **call).images[0] for prompt, seed in zip(prompts, seeds)]


async def _collect(backend, params_list):
    await backend.start()
    streams = [await backend.add_request(p) for p in params_list]

    async def drain(stream):
        return [event async for event in stream]

    events = await asyncio.gather(*(drain(s) for s in streams))
    await backend.shutdown()
    return events


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


def _assert_same_images(results, expected):
    for result, reference in zip(results, expected):
        diff = np.abs(_pixels(result.image) - _pixels(reference))
        # equal up to float rounding at the uint8 boundary (batched vs single matmuls)
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("system", ["diffusers-sequential", "request-batching"])
def test_sd3_baselines_match_the_pipeline(system, tiny_sd3_dir):
    seeds = [11, 12, 13]
    backend = make_backend(system, tiny_sd3_dir, batch_wait_ms=500)
    batches = []
    backend.add_step_listener(lambda step: batches.append(step.num_requests))
    params = [GenerationParams(prompt, num_inference_steps=STEPS, seed=seed) for prompt, seed in zip(PROMPTS, seeds)]
    events = asyncio.run(_collect(backend, params))
    results = [evs[-1] for evs in events]
    assert all(isinstance(r, GenerationResult) for r in results)
    assert [r.params.seed for r in results] == seeds
    progress = [e for e in events[0] if isinstance(e, StepProgress)]
    assert [e.step for e in progress] == list(range(1, STEPS + 1)) and progress[-1].total == STEPS
    expected_batches = [1] * (3 * STEPS) if system == "diffusers-sequential" else [3] * STEPS
    assert batches == expected_batches
    assert results[0].timings.steps == STEPS and results[0].timings.total_s >= results[0].timings.queued_s
    _assert_same_images(results, _pipeline_images(tiny_sd3_dir, "StableDiffusion3Pipeline", PROMPTS, seeds,
                                                  max_sequence_length=256))


def test_sd15_request_batching_matches_the_pipeline(tiny_sd15_dir):
    seeds = [5, 6]
    backend = make_backend("request-batching", tiny_sd15_dir, batch_wait_ms=500)
    params = [GenerationParams(p, num_inference_steps=STEPS, seed=s) for p, s in zip(PROMPTS, seeds)]
    results = [evs[-1] for evs in asyncio.run(_collect(backend, params))]
    _assert_same_images(results, _pipeline_images(tiny_sd15_dir, "StableDiffusionPipeline", PROMPTS, seeds))


def test_request_batching_only_batches_equal_parameters(tiny_sd3_dir):
    backend = make_backend("request-batching", tiny_sd3_dir, batch_wait_ms=300)
    sizes = []
    backend.add_step_listener(lambda step: sizes.append(step.num_requests))
    params = [GenerationParams(PROMPTS[0], num_inference_steps=2, seed=1),
              GenerationParams(PROMPTS[1], num_inference_steps=3, seed=2),
              GenerationParams(PROMPTS[2], num_inference_steps=2, seed=3)]
    events = asyncio.run(_collect(backend, params))
    assert all(isinstance(evs[-1], GenerationResult) for evs in events)
    # requests 0 and 2 (2 steps) run together, then request 1 (3 steps) alone
    assert sizes == [2, 2, 1, 1, 1]


def test_request_batching_respects_the_row_budget(tiny_sd3_dir):
    # guidance > 1 takes two rows per request: 4 rows fit two requests per batch
    backend = make_backend("request-batching", tiny_sd3_dir, batch_wait_ms=300, max_batch_rows=4)
    sizes = []
    backend.add_step_listener(lambda step: sizes.append(step.num_requests))
    params = [GenerationParams(PROMPTS[i % 3], num_inference_steps=1, seed=i) for i in range(5)]
    asyncio.run(_collect(backend, params))
    assert sizes == [2, 2, 1]


def test_abort_queue_bound_validation_and_shutdown(tiny_sd3_dir):
    backend = make_backend("diffusers-sequential", tiny_sd3_dir, max_waiting=2)

    async def scenario():
        with pytest.raises(InvalidRequestError, match="num_inference_steps"):
            await backend.add_request(GenerationParams("a cat", num_inference_steps=0))
        # not started yet, so all requests wait and the bound is reached deterministically
        first = await backend.add_request(GenerationParams("a cat", num_inference_steps=STEPS, seed=1))
        second = await backend.add_request(GenerationParams("a dog", num_inference_steps=STEPS, seed=2))
        with pytest.raises(QueueFullError, match="queue is full"):
            await backend.add_request(GenerationParams("a pig", num_inference_steps=STEPS))
        with pytest.raises(InvalidRequestError, match="already in use"):
            await backend.add_request(GenerationParams("a cow"), request_id=first.request_id)
        assert await backend.abort(first.request_id)
        assert not await backend.abort("no-such-request")
        third = await backend.add_request(GenerationParams("a cow", num_inference_steps=STEPS, seed=3))
        await backend.start()
        events = [[e async for e in s] for s in (first, second, third)]
        await backend.shutdown(drain=True)
        with pytest.raises(EngineStoppedError):
            await backend.add_request(GenerationParams("late"))
        return events

    first, second, third = asyncio.run(scenario())
    assert isinstance(first[-1], RequestFailed) and first[-1].reason == "aborted"
    assert isinstance(second[-1], GenerationResult) and isinstance(third[-1], GenerationResult)
    assert [e.position for e in third if isinstance(e, Queued)] == [1, 0]  # joins behind second, then next
    assert [e.position for e in second if isinstance(e, Queued)] == [1, 0]
    assert backend.stats().num_waiting == 0 and backend.stats().steps_total == 2 * STEPS


def test_previews_at_the_requested_steps(tiny_sd3_dir):
    backend = make_backend("diffusers-sequential", tiny_sd3_dir)
    params = GenerationParams("a cat", num_inference_steps=4, seed=1, partial_images=1)
    (events,) = asyncio.run(_collect(backend, [params]))
    previews = {e.step: e.preview for e in events if isinstance(e, StepProgress) and e.preview is not None}
    assert list(previews) == sorted(params.preview_steps(4)) == [2]
    final = events[-1].image
    assert previews[2].size == (final.width // 2, final.height // 2)


def test_aborting_the_running_request_interrupts_the_call(tiny_sd3_dir):
    backend = make_backend("diffusers-sequential", tiny_sd3_dir)

    async def scenario():
        await backend.start()
        stream = await backend.add_request(GenerationParams("a cat", num_inference_steps=50, seed=1))
        events = []
        async for event in stream:
            events.append(event)
            if isinstance(event, StepProgress) and event.step == 2:
                assert await backend.abort(stream.request_id)
        await backend.shutdown()
        return events

    events = asyncio.run(scenario())
    assert isinstance(events[-1], RequestFailed) and events[-1].reason == "aborted"
    # the worker stopped stepping soon after the abort instead of running all 50 steps
    assert backend.stats().steps_total < 50


def test_unknown_options_and_systems_are_explained(tiny_sd3_dir):
    with pytest.raises(TypeError, match="max_latent_tokens"):
        BaselineConfig.from_kwargs(max_latent_tokens=4)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_backend("ray-serve", tiny_sd3_dir)


async def _events_of(backend, params_list):
    """Admit all, in order, while the worker is busy with the first; return each request's events."""
    streams = [await backend.add_request(p) for p in params_list]

    async def drain(stream):
        return [event async for event in stream]

    return await asyncio.gather(*(drain(s) for s in streams))


@pytest.mark.parametrize("shed_late", [True, False])
def test_baseline_sheds_requests_that_cannot_meet_their_slo(shed_late, tiny_sd3_dir):
    backend = make_backend("diffusers-sequential", tiny_sd3_dir, shed_late=shed_late)

    async def scenario():
        await backend.start()
        # Before any call was measured nothing is shed, however tight the SLO.
        first = await _events_of(backend, [GenerationParams("a", num_inference_steps=STEPS, seed=1, slo_ms=1)])
        # Then: one request occupies the worker, a tight-SLO one waits behind it, a loose one too.
        later = await _events_of(backend, [
            GenerationParams("b", num_inference_steps=STEPS, seed=2),
            GenerationParams("c", num_inference_steps=STEPS, seed=3, slo_ms=1),
            GenerationParams("d", num_inference_steps=STEPS, seed=4, slo_ms=600_000)])
        await backend.shutdown()
        return first + later

    events = asyncio.run(scenario())
    finals = [evs[-1] for evs in events]
    assert isinstance(finals[0], GenerationResult)
    assert isinstance(finals[1], GenerationResult) and isinstance(finals[3], GenerationResult)
    if shed_late:
        assert isinstance(finals[2], RequestFailed) and finals[2].reason == "deadline_exceeded"
        assert "exceeds the SLO" in finals[2].message
        assert backend.stats().dropped_total == 1
    else:
        assert isinstance(finals[2], GenerationResult) and backend.stats().dropped_total == 0
