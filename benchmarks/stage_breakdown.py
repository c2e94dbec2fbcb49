"""Where a step-level engine's time goes in steady state, versus one batched pipeline call.

Keeps ``--inflight`` requests in the engine, admitting a new one whenever one finishes
(arrivals are staggered, as under continuous load), and sums the runner's stage times:
prefill (text encoding + noise), denoise (the batched forward + per-request samplers)
and decode (VAE). For comparison it times the same work done as request batching does
it: one pipeline call over ``--inflight`` identical-parameter requests.

    python benchmarks/stage_breakdown.py --model glide-small --inflight 8 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from glideserve import Engine, GenerationParams, GenerationResult
from glideserve.models.loading import load_pipeline, serving_defaults
from glideserve.toy.dataset import all_captions


def engine_breakdown(model: str, inflight: int, steps: int, images: int) -> tuple[dict, float]:
    engine = Engine.from_pretrained(model, max_batch_rows=2 * inflight, max_waiting=images)
    captions = all_captions()
    totals = {"prefill_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0, "other_s": 0.0}
    submitted = done = 0
    start = time.perf_counter()
    # Stagger: admit one request per step until the batch is full, then one per finished one.
    while done < images:
        if submitted < images and engine.core.scheduler.num_running + engine.core.scheduler.num_waiting < inflight:
            engine.add_request(GenerationParams(captions[submitted % len(captions)], num_inference_steps=steps,
                                                seed=submitted))
            submitted += 1
        events = engine.step()
        stats = engine.core.last_step
        for name in ("prefill_s", "denoise_s", "decode_s"):
            totals[name] += getattr(stats.timing, name)
        totals["other_s"] += stats.duration_s - stats.timing.total_s
        done += sum(isinstance(e, GenerationResult) for e in events)
    return totals, time.perf_counter() - start


def pipeline_batch_time(model: str, inflight: int, steps: int, repeats: int) -> float:
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    max_seq = serving_defaults(model).get("max_sequence_length", 256)
    guidance = serving_defaults(model).get("default_guidance", 7.0)
    captions = all_captions()[:inflight]
    start = time.perf_counter()
    for r in range(repeats):
        generators = [torch.Generator("cpu").manual_seed(r * inflight + i) for i in range(inflight)]
        pipe(captions, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
             max_sequence_length=max_seq)
    return (time.perf_counter() - start) / (repeats * inflight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="glide-small")
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    totals, wall = engine_breakdown(args.model, args.inflight, args.steps, args.images)
    per_image = {k: v / args.images * 1e3 for k, v in totals.items()}
    print(f"step-level engine, {args.inflight} in flight, staggered, {args.images} images of {args.steps} steps:")
    print("  per image (ms): " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in per_image.items())
          + f"; wall {wall / args.images * 1e3:.1f}")
    batched = pipeline_batch_time(args.model, args.inflight, args.steps, max(1, args.images // args.inflight))
    print(f"one pipeline call over {args.inflight} requests: {batched * 1e3:.1f} ms per image")


if __name__ == "__main__":
    main()
