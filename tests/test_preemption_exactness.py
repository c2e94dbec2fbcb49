"""A request paused at a step boundary and resumed later gives the same image as an unpaused run.

The runner keeps a paused request's latents, sampler and conditioning, so preemption
must not change a single pixel. The scheduler runs on a manual clock with a fixed
profile (its online updates are switched off by a negligible EWMA weight), so the
preemption happens at a known step whatever the machine's speed.
"""

from __future__ import annotations

import numpy as np

from glideserve import Engine, GenerationParams, GenerationResult
from glideserve.scheduler.profile import LatencyProfile, PiecewiseLinear
from glideserve.scheduler.scheduler import Scheduler

MAX_SEQ = 16


def _engine(tiny_sd3_dir, policy: str) -> tuple[Engine, list[float]]:
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=MAX_SEQ, max_batch_rows=2, policy=policy)
    core = engine.core
    tokens = core.spec.tokens_per_row(32, 32)
    profile = LatencyProfile(steps={tokens: PiecewiseLinear({1: 0.1, 2: 0.2})}, alpha=1e-9)
    now = [0.0]
    core.scheduler = Scheduler(core.config.scheduler, clock=lambda: now[0], profile=profile)
    return engine, now


def _run(engine: Engine, now: list[float]) -> dict[str, np.ndarray]:
    a = GenerationParams("a red circle", num_inference_steps=12, seed=5, height=32, width=32)  # best effort
    b = GenerationParams("a blue square", num_inference_steps=6, seed=6, height=32, width=32, slo_ms=2000)
    engine.add_request(a, "a")
    images = {}
    for step in range(100):
        if step == 3:  # a has 9 steps left (1.8 s by the profile); b alone needs 1.2 s of its 2 s
            engine.add_request(b, "b")
        if not engine.has_unfinished():
            break
        for event in engine.step():
            if isinstance(event, GenerationResult):
                images[event.request_id] = np.asarray(event.image).astype(int)
        now[0] += 0.2
    return images


def test_a_paused_and_resumed_request_gives_the_image_of_an_unpaused_run(tiny_sd3_dir):
    engine, now = _engine(tiny_sd3_dir, "slack")
    preempted = _run(engine, now)
    assert engine.core.scheduler.counters.preempted == 1 and engine.core.scheduler.counters.resumed == 1
    engine, now = _engine(tiny_sd3_dir, "fcfs")  # deadline-blind: a runs to the end, then b
    plain = _run(engine, now)
    assert engine.core.scheduler.counters.preempted == 0
    for rid in ("a", "b"):
        assert np.abs(preempted[rid] - plain[rid]).max() <= 2  # the engine's exactness bar, in 1/255
