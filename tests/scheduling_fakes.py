"""A fake runner and clocks for scheduler tests: no model, no tensors, deterministic time."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from glideserve.cache.policy import StepKind, parse_cache_policy
from glideserve.outputs import GenerationResult, RequestFailed
from glideserve.params import GenerationParams
from glideserve.request import Request
from glideserve.scheduler.output import (DecodeTiming, FinishedImage, GroupTiming, RunnerOutput, SchedulerOutput,
                                         StageTiming)
from glideserve.scheduler.profile import LatencyProfile, PiecewiseLinear

LATENT_FACTOR = 8  # tokens per row = (height / 8) * (width / 8) in these tests


def tokens_of(params: GenerationParams) -> int:
    return (params.height // LATENT_FACTOR) * (params.width // LATENT_FACTOR)


class Clock:
    """Advances one second per call: every event gets its own time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


class ManualClock:
    """Time moves only when a test (or the fake runner) advances it."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRunner:
    """Counts steps per request like the real runner and 'decodes' what the plan lists.

    With a ``clock`` and ``group_s(tokens_per_row, rows)``, each step advances the clock by
    the modelled cost of one forward per size (plus ``decode_s`` per decode call) and
    reports those timings, as the real runner reports measured ones.
    """

    def __init__(self, clock: ManualClock | None = None, group_s: Callable[[int, int], float] = lambda t, r: 0.0,
                 decode_s: float = 0.0, cached_share: float | None = None):
        self.states: dict[str, list] = {}  # id -> [steps_done, num_steps, params]
        self.plans: list[SchedulerOutput] = []
        self.steps_run: dict[str, int] = {}
        self.clock = clock
        self.group_s = group_s
        self.decode_s = decode_s
        # With a share, rows the plan marks cached cost that fraction of a full row and are reported as cached.
        self.cached_share = cached_share

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.plans.append(plan)
        out = RunnerOutput(timing=StageTiming())
        for rid in plan.freed:
            self.states.pop(rid, None)
        for data in plan.new_requests:
            assert data.request_id not in self.states, f"{data.request_id} prefilled twice"
            self.states[data.request_id] = [0, data.params.num_inference_steps, data.params]
        groups: dict[int, list[int]] = {}
        for rid in plan.scheduled:
            state = self.states[rid]
            assert state[0] < state[1], f"{rid} stepped past its last step"
            state[0] += 1
            self.steps_run[rid] = self.steps_run.get(rid, 0) + 1
            out.stepped.append(rid)
            rows = 2 if state[2].uses_cfg else 1
            group = groups.setdefault(tokens_of(state[2]), [0, 0, 0])
            group[0] += rows
            group[1] += 1
            if self.cached_share is not None:
                kind = plan.step_kinds.get(rid, StepKind.FULL)
                kind = StepKind.FULL if kind is StepKind.AUTO else kind
                out.step_kinds[rid] = kind
                group[2] += rows if kind is StepKind.CACHED else 0
        for tokens, (rows, requests, cached) in groups.items():
            full = rows - cached
            seconds = (self.group_s(tokens, full) if full else 0.0) + cached * (self.cached_share or 0.0) \
                * self.group_s(tokens, 1)
            out.timing.groups.append(GroupTiming(tokens, rows, requests, seconds, cached))
            self._advance(seconds)
        decoded: dict[int, int] = {}
        for rid in plan.decode:
            state = self.states.pop(rid)
            assert state[0] == state[1], f"{rid} decoded before its last step"
            out.finished[rid] = FinishedImage(Image.new("RGB", (1, 1)), self.decode_s)
            decoded[tokens_of(state[2])] = decoded.get(tokens_of(state[2]), 0) + 1
        for tokens, images in decoded.items():
            out.timing.decodes.append(DecodeTiming(tokens, images, self.decode_s))
            self._advance(self.decode_s)
        return out

    def _advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)


def run_until_done(sched, runner, clock, max_steps=10_000, on_step=None, until: float = 0.0, min_steps: int = 0):
    """Step until nothing is left (and the clock has reached ``until`` and ``min_steps`` steps have passed,
    idling 10 ms at a time); returns {id: (final event, time)}."""
    finals = {}
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if not sched.has_unfinished():
            if clock.now >= until and step >= min_steps:
                break
            clock.advance(0.01)
            continue
        plan = sched.schedule()
        for event in sched.update(plan, runner.execute(plan)):
            if isinstance(event, (GenerationResult, RequestFailed)):
                finals[event.request_id] = (event, clock.now)
    return finals


def make_request(rid: str, steps: int = 3, cfg: bool = True, size: int = 32, slo_ms: float | None = None,
                 priority: int = 0, arrival: float = 0.0, prompt: str = "p", cache: str = "none") -> Request:
    params = GenerationParams(prompt, num_inference_steps=steps, guidance_scale=5.0 if cfg else 1.0, seed=0,
                              height=size, width=size, sampler="x", slo_ms=slo_ms, priority=priority, cache=cache)
    return Request(rid, params, num_steps=steps, rows=2 if cfg else 1, tokens_per_row=tokens_of(params),
                   arrival_time=arrival, cache_policy=parse_cache_policy(cache), cache_bytes=100 if cache != "none" else 0)


def linear_profile(per_row_s: float, fixed_s: float = 0.0, tokens: int = 16, max_rows: int = 64,
                   decode_s: float = 0.0) -> LatencyProfile:
    """A profile whose step costs ``fixed_s + rows * per_row_s`` at ``tokens`` tokens per row."""
    points = {r: fixed_s + r * per_row_s for r in (1, max_rows)}
    return LatencyProfile(steps={tokens: PiecewiseLinear(points)},
                          decode={tokens: PiecewiseLinear({1: decode_s})} if decode_s else {})
