"""Per-request step kinds: which scheduled requests take a full step and which reuse their cache.

Counter policies (GlideServe's cache, FORA, TaylorSeer, DeepCache) are decided here:
a request takes a full step at its first step and whenever its counter has run out;
a full step resets the counter to the policy's interval and each cached step
decrements it. With ``full_slots`` (progressive batching) at most that many caching
requests take a full step per step, in GlideServe's priority: requests at their first
step, then those whose counter ran out longest ago; the rest keep reusing their cache
(their counters go negative while they wait). Threshold policies (TeaCache,
First-Block-Cache) are left to the runner (``AUTO``) after their first step.

``adaptive`` requests get a share of full steps chosen by the scheduler each step
(``full_fraction``, from the deadlines): that share of them, carried over between
steps so that fractions add up, computes fully; first those whose cached streak
reached the quality floor, then those whose inputs changed most since their last
full step (``cache_drift``).
"""

from __future__ import annotations

import math

from glideserve.cache.policy import StepKind
from glideserve.request import Request


def cached_streak_limit(min_full_fraction: float) -> int:
    """Most cached steps in a row that keep at least ``min_full_fraction`` of the steps full."""
    return max(0, math.floor(1.0 / min_full_fraction - 1.0 + 1e-9))


def floor_fraction(min_full_fraction: float) -> float:
    """The share of full steps an adaptive request takes at the most caching allowed."""
    return 1.0 / (cached_streak_limit(min_full_fraction) + 1)


class StepKindPlanner:
    """Decides step kinds; holds the adaptive policy's carried-over share of full steps."""

    def __init__(self, full_slots: int | None, min_full_fraction: float):
        self.full_slots = full_slots
        self.max_cached_streak = cached_streak_limit(min_full_fraction)
        self._credit = 0.0

    def plan(self, scheduled: list[Request], full_fraction: float = 1.0) -> dict[str, StepKind]:
        """The step kind of every scheduled request, by id."""
        kinds: dict[str, StepKind] = {}
        wanting: list[Request] = []
        adaptive: list[Request] = []
        for r in scheduled:
            policy = r.cache_policy
            if not policy.enabled or not r.cache_granted or r.steps_done == 0:
                kinds[r.request_id] = StepKind.FULL
                if policy.enabled and r.cache_granted and not policy.is_adaptive:
                    wanting.append(r)  # a first step takes a progressive-batching slot
            elif policy.is_adaptive:
                adaptive.append(r)
            elif policy.scheduler_decides and r.cache_counter <= 0:
                wanting.append(r)
            else:
                kinds[r.request_id] = StepKind.CACHED if policy.scheduler_decides else StepKind.AUTO
        self._plan_counters(wanting, kinds)
        self._plan_adaptive(adaptive, full_fraction, kinds)
        return kinds

    def _plan_counters(self, wanting: list[Request], kinds: dict[str, StepKind]) -> None:
        wanting.sort(key=lambda r: (r.steps_done > 0, r.cache_counter))
        for n, r in enumerate(wanting):
            over = self.full_slots is not None and n >= self.full_slots and r.steps_done > 0
            kinds[r.request_id] = StepKind.CACHED if over else StepKind.FULL

    def _plan_adaptive(self, adaptive: list[Request], full_fraction: float, kinds: dict[str, StepKind]) -> None:
        if not adaptive or full_fraction >= 1.0:  # no pressure: exact
            self._credit = 0.0
            kinds.update((r.request_id, StepKind.FULL) for r in adaptive)
            return
        n = len(adaptive)
        self._credit = min(float(n), self._credit + full_fraction * n)
        forced = [r for r in adaptive if -r.cache_counter >= self.max_cached_streak]
        budget = max(len(forced), int(self._credit + 1e-9))
        self._credit = max(-float(n), self._credit - budget)
        order = sorted(adaptive, key=lambda r: (-r.cache_counter < self.max_cached_streak, -r.cache_drift))
        for i, r in enumerate(order):
            kinds[r.request_id] = StepKind.FULL if i < budget else StepKind.CACHED


def record_step_kind(request: Request, kind: StepKind, change: float | None = None) -> None:
    """Count the kind a request's step took, move its counter, and add the measured input change."""
    if kind is StepKind.CACHED:
        request.cached_steps += 1
        request.cache_counter -= 1
        request.cache_drift += change or 0.0
    else:
        request.full_steps += 1
        request.cache_counter = request.cache_policy.interval
        request.cache_drift = 0.0
