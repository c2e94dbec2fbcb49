"""Prefill and decode as stages: batched text encoding with an LRU, bounded batched decode."""

from __future__ import annotations

import numpy as np

from glideserve import Engine, GenerationParams, GenerationResult


def _counting(obj, name, calls):
    real = getattr(obj, name)

    def wrapper(arg, *rest, **kw):
        calls.append(len(arg))
        return real(arg, *rest, **kw)

    setattr(obj, name, wrapper)


def test_text_encoding_is_batched_and_cached(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, prompt_cache_size=3)
    runner = engine.core.runner
    calls: list[int] = []
    _counting(runner.family, "encode", calls)
    prompts = ["a cat", "a dog", "a cat", "a bird"]
    engine.generate([GenerationParams(p, num_inference_steps=2, seed=1, guidance_scale=1.0) for p in prompts])
    assert calls == [3]  # one batched call for the distinct prompts of the admitted requests
    engine.generate([GenerationParams("a bird", num_inference_steps=2, seed=1, guidance_scale=1.0)])
    assert calls == [3] and runner.encoder.hits == 1  # served from the LRU, no new encode
    engine.generate([GenerationParams(p, num_inference_steps=2, seed=1, guidance_scale=1.0)
                     for p in ["e1", "e2", "e3", "e4"]])
    assert len(runner.encoder._cache) == 3  # bounded


def test_decode_is_batched_and_bounded_per_step(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_decode_batch=2)
    runner = engine.core.runner
    calls: list[int] = []
    _counting(runner.family, "decode", calls)
    for i in range(3):  # all three finish on the same step
        engine.add_request(GenerationParams(f"p{i}", num_inference_steps=3, seed=i))
    finished_per_step = []
    while engine.has_unfinished():
        finished_per_step.append(sum(isinstance(e, GenerationResult) for e in engine.step()))
    assert calls == [2, 1]  # at most max_decode_batch images per VAE call, the rest on the next step
    assert finished_per_step == [0, 0, 2, 1]


def test_finished_images_wait_for_companions_while_the_engine_is_saturated(tiny_sd3_dir):
    # Two guided requests fill the 4-row budget and a third waits: the first to finish is held
    # (at most max_decode_wait_steps) and decoded together with others.
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=4,
                                    max_decode_wait_steps=2, policy="fcfs")
    runner = engine.core.runner
    calls: list[int] = []
    _counting(runner.family, "decode", calls)
    engine.add_request(GenerationParams("a", num_inference_steps=3, seed=0))
    engine.step()
    engine.add_request(GenerationParams("b", num_inference_steps=3, seed=1))
    engine.add_request(GenerationParams("c", num_inference_steps=2, seed=2))
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, GenerationResult):
                results[event.params.prompt] = event
    assert len(calls) < 3 and sum(calls) == 3
    assert results["a"].timings.decode_s == results["b"].timings.decode_s  # one call


def test_different_sizes_never_share_a_forward(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    family = engine.core.runner.family
    shapes = []
    real = family.denoise

    def denoise(latents, timesteps, cond, groups):
        shapes.append(tuple(latents.shape))
        return real(latents, timesteps, cond, groups)

    family.denoise = denoise
    results = engine.generate([GenerationParams("a", num_inference_steps=2, seed=0, height=32, width=32),
                               GenerationParams("b", num_inference_steps=2, seed=0, height=16, width=32)])
    assert sorted(set(shapes)) == [(2, 4, 8, 16), (2, 4, 16, 16)]
    assert [r.image.size for r in results] == [(32, 32), (32, 16)]
    assert not np.array_equal(np.asarray(results[0].image)[:16], np.asarray(results[1].image))


def test_previews_only_for_requests_that_ask(tiny_sd3_dir):
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    engine.add_request(GenerationParams("a", num_inference_steps=8, seed=0, partial_images=3), "with")
    engine.add_request(GenerationParams("b", num_inference_steps=8, seed=0), "without")
    previews: dict[str, list[int]] = {"with": [], "without": []}
    while engine.has_unfinished():
        for event in engine.step():
            if getattr(event, "preview", None) is not None:
                previews[event.request_id].append(event.step)
                assert event.preview.size == (16, 16)  # half of the 32x32 image
    assert previews == {"with": [2, 4, 6], "without": []}


def test_previews_show_the_predicted_image_not_the_noise():
    # On the trained glide-tiny, a halfway preview decodes the model's clean-image
    # prediction: close to the final image (mean diff ~9/255), where decoding the noisy
    # latents of the same step is ~85/255 away.
    engine = Engine.from_pretrained("glide-tiny")
    engine.add_request(GenerationParams("a red circle on a blue background", seed=3, partial_images=1), "r")
    preview = final = None
    while engine.has_unfinished():
        for event in engine.step():
            if getattr(event, "preview", None) is not None:
                preview = event.preview
            if isinstance(event, GenerationResult):
                final = event.image
    target = np.asarray(final.resize(preview.size)).astype(float)
    assert np.abs(np.asarray(preview).astype(float) - target).mean() < 30
