"""Engine step overhead: scheduler + bookkeeping time per step, with a no-op model.

For batch sizes 1, 4 and 16 (requests in flight, each with classifier-free guidance),
it runs the engine twice on the same tiny SD3 model: once with the model forward
replaced by a no-op (what is left is the scheduler, the runner's gathering and
splitting, CFG and the per-request sampler updates), once with the real forward.
It prints the overhead per step and its share of the real step time.

    python benchmarks/step_overhead.py [--steps 30] [--dim 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from glideserve import Engine, GenerationParams
from glideserve.cache.policy import StepKind
from glideserve.models.build import SD3Dims, build_sd3_pipeline


def time_steps(engine: Engine, batch: int, steps: int, noop: bool) -> tuple[float, float]:
    """Mean seconds per engine step and per scheduler call, with all ``batch`` requests running."""
    family = engine.core.runner.family
    real_denoise = family.denoise
    if noop:
        family.denoise = lambda latents, timesteps, cond, groups: (torch.zeros_like(latents),
                                                                   [StepKind.FULL] * len(groups))
    try:
        for i in range(batch):
            engine.add_request(GenerationParams(f"prompt {i}", num_inference_steps=steps + 5, seed=i,
                                                guidance_scale=4.0))
        engine.step()  # prefill (text encoding, noise) is not part of the steady-state step
        sched = engine.core.scheduler
        sched_time = 0.0
        schedule, update = sched.schedule, sched.update

        def timed(fn):
            def wrapper(*args):
                nonlocal sched_time
                t0 = time.perf_counter()
                out = fn(*args)
                sched_time += time.perf_counter() - t0
                return out
            return wrapper

        sched.schedule, sched.update = timed(schedule), timed(update)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        sched.schedule, sched.update = schedule, update
        while engine.has_unfinished():
            engine.step()
        return elapsed / steps, sched_time / steps
    finally:
        family.denoise = real_denoise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--dim", type=int, default=64, help="transformer width of the tiny model (heads x 32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dims = SD3Dims(layers=4, heads=max(1, args.dim // 32), head_dim=32, image_size=64)
    with tempfile.TemporaryDirectory() as folder:
        build_sd3_pipeline(dims).save_pretrained(folder)
        engine = Engine.from_pretrained(folder, max_sequence_length=32, max_batch_rows=64)
        print(f"tiny SD3 (width {args.dim}, 4 blocks, 64x64 image, 256 latent tokens), torch threads "
              f"{torch.get_num_threads()}, {args.steps} steps per point, CFG on (2 rows per request)")
        print(f"{'batch':>5} {'noop step ms':>13} {'of which sched ms':>18} {'real step ms':>13} {'overhead share':>15}")
        for batch in (1, 4, 16):
            overhead, sched = time_steps(engine, batch, args.steps, noop=True)
            real, _ = time_steps(engine, batch, args.steps, noop=False)
            print(f"{batch:>5} {overhead * 1e3:>13.2f} {sched * 1e3:>18.3f} {real * 1e3:>13.2f} "
                  f"{overhead / real:>14.1%}")


if __name__ == "__main__":
    main()
