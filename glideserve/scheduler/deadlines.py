"""Deadline decisions from the latency profile: refuse, drop, hold back, preempt, decode now.

:class:`DeadlinePlanner` turns the scheduler's requests into simulation entries and
answers the questions the deadline-aware policies ask at each step. It reads
requests and the profile and changes neither: the scheduler applies its answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from glideserve.config import SchedulerConfig
from glideserve.request import Request, RequestStatus
from glideserve.scheduler.caching import floor_fraction
from glideserve.scheduler.profile import LatencyProfile
from glideserve.scheduler.simulate import TOLERANCE_S, SimEntry, SimResult, joining_harms, simulate

# Fractions of full steps the adaptive policy tries, most exact first, before falling to the floor.
FULL_FRACTIONS = (1.0, 0.8, 0.65, 0.5, 0.4)


@dataclass(frozen=True)
class AdmissionVerdict:
    """Whether a new request may be queued; if not, why, its predicted latency and a retry delay."""

    admitted: bool
    predicted_latency_s: float | None = None
    reason: str = ""
    retry_after_s: float = 0.0
    harms_others: bool = False


class DeadlinePlanner:
    """Predictions over requests with the profile; see the module docstring."""

    def __init__(self, profile: LatencyProfile, config: SchedulerConfig):
        self.profile = profile
        self.config = config
        self.floor = floor_fraction(config.min_full_fraction)  # adaptive's share of full steps at most caching

    # -- building blocks -----------------------------------------------------------
    def step_s(self, running: Iterable[Request]) -> float:
        """Predicted seconds of one step of the requests in ``running``."""
        groups: dict[int, int] = {}
        for r in running:
            groups[r.tokens_per_row] = groups.get(r.tokens_per_row, 0) + r.rows
        return self.profile.step_s(groups.items())

    def drop_after(self, request: Request) -> float | None:
        factor = self.config.drop_late_after
        if factor is None or request.deadline is None:
            return None
        return request.deadline + factor * request.slo_s

    def cost_share(self, request: Request, adaptive_fraction: float | None = None) -> float:
        """Average fraction of a full step's cost the request's rows pay per step: 1 without a cache;
        with one, its full-step fraction (``adaptive_fraction`` for ``adaptive``, by default the quality
        floor: what the request needs at the most caching allowed) plus the cached steps' small share."""
        policy = request.cache_policy
        admitted = request.status in (RequestStatus.RUNNING, RequestStatus.PAUSED)
        if not policy.enabled or (admitted and not request.cache_granted):
            return 1.0
        if policy.is_adaptive:
            full = self.floor if adaptive_fraction is None else adaptive_fraction
        else:
            full = policy.full_fraction()
        if full is None:  # threshold policies decide from the images: assume nothing is saved
            return 1.0
        return full + (1.0 - full) * self.profile.cached_row_share

    def _entries(self, running: Sequence[Request], queue: Sequence[Request], prefilled: set[str],
                 drops: bool, exempt: str | None = None, adaptive_fraction: float | None = None) -> list[SimEntry]:
        def entry(r: Request, is_running: bool) -> SimEntry:
            drop = self.drop_after(r) if drops and r.request_id != exempt else None
            # A prompt encoded ahead of its turn is in the runner's cache: joining costs next to nothing.
            return SimEntry(r.request_id, r.rows, r.tokens_per_row, r.remaining_steps, running=is_running,
                            prefilled=is_running or r.request_id in prefilled or r.prefetched, drop_after=drop,
                            deadline=r.deadline, holds=r.effective_deadline is None,
                            cost_share=self.cost_share(r, adaptive_fraction))

        return [entry(r, True) for r in running] + [entry(r, False) for r in queue]

    def predict(self, now: float, running: Sequence[Request], queue: Sequence[Request],
                prefilled: set[str] = frozenset(), drops: bool = False, exempt: str | None = None,
                adaptive_fraction: float | None = None) -> SimResult:
        """Finish times if ``running`` keep stepping and ``queue`` joins in order (``adaptive`` requests
        at ``adaptive_fraction`` full steps; by default at the quality floor)."""
        c = self.config
        return simulate(now, self._entries(running, queue, prefilled, drops, exempt, adaptive_fraction),
                        self.profile, c.max_batch_rows, c.max_latent_tokens)

    def full_fraction(self, now: float, running: Sequence[Request], queue: Sequence[Request],
                      prefilled: set[str] = frozenset()) -> float:
        """The largest fraction of full steps for ``adaptive`` requests that keeps on time, with the
        admission margin, every request that the most caching allowed (the quality floor) would keep on
        time: 1 (exact) unless load needs less."""
        floor = self.floor
        at_floor = self.predict(now, running, queue, prefilled, adaptive_fraction=floor)
        # Each protected request must finish the admission margin before its deadline (prediction error is
        # as real here as at admission), or no later than the floor would finish it when that is later.
        targets = {}
        for r in (*running, *queue):
            finish = at_floor.finish.get(r.request_id, math.inf)
            if r.deadline is not None and finish <= r.deadline + TOLERANCE_S:
                targets[r.request_id] = max(finish, r.deadline - self.config.admission_margin * r.slo_s)
        for fraction in FULL_FRACTIONS:
            if fraction <= floor:
                break
            trial = self.predict(now, running, queue, prefilled, adaptive_fraction=fraction)
            if all(trial.finish.get(rid, math.inf) <= target + TOLERANCE_S for rid, target in targets.items()):
                return fraction
        return floor

    # -- decisions ----------------------------------------------------------------------
    def admission(self, now: float, request: Request, running: Sequence[Request], queue: Sequence[Request],
                  prefilled: set[str]) -> AdmissionVerdict:
        """Admit ``request`` (already placed in ``queue`` in policy order) only if it meets its
        deadline and no request now predicted on time becomes late because of it."""
        others = [r for r in queue if r is not request]
        drops = self.config.drop_late_after is not None
        with_it = self.predict(now, running, queue, prefilled, drops, exempt=request.request_id)
        finish = with_it.finish.get(request.request_id, math.inf)
        if finish > request.deadline - self.config.admission_margin * request.slo_s + TOLERANCE_S:
            return AdmissionVerdict(False, finish - request.arrival_time,
                                    f"its slo_ms={request.params.slo_ms:g} is shorter than the work ahead "
                                    "of it and its own steps",
                                    finish - request.deadline)
        without = self.predict(now, running, others, prefilled, drops)
        for r in (*running, *others):
            if r.deadline is None:
                continue
            before, after = without.finish.get(r.request_id), with_it.finish.get(r.request_id, math.inf)
            if before is not None and before <= r.deadline + TOLERANCE_S < after:
                return AdmissionVerdict(False, finish - request.arrival_time,
                                        "admitting it would make an admitted request miss its deadline",
                                        after - r.deadline, harms_others=True)
        return AdmissionVerdict(True, finish - request.arrival_time)

    def joining_harms(self, now: float, members: Sequence[Request], candidate: Request) -> bool:
        """Would ``candidate`` joining the running ``members`` now make an on-time member late?"""
        entries = self._entries(members, (candidate,), set(), drops=False)
        return joining_harms(now, [(e, e.remaining) for e in entries[:-1]], entries[-1], self.profile)

    def victims_for(self, now: float, candidate: Request, running: Sequence[Request],
                    wait_finish: float | None) -> list[Request] | None:
        """Running requests to pause so that ``candidate`` (with a deadline) makes it.

        Only when waiting would make ``candidate`` late (``wait_finish`` past its deadline)
        and pausing keeps it on time; the least urgent requests (``running`` is in policy
        order) are paused, each only if it still meets its own deadline after waiting for
        the whole of ``candidate``'s service. ``None`` when no such set exists.
        """
        if candidate.deadline is None or wait_finish is None or wait_finish <= candidate.deadline:
            return None
        c = self.config
        kept, victims = list(running), []
        rows = sum(r.rows for r in kept)
        tokens = sum(r.cost_tokens for r in kept)
        for victim in reversed(running):
            if rows + candidate.rows <= c.max_batch_rows and tokens + candidate.cost_tokens <= c.max_latent_tokens:
                break
            kept.remove(victim)
            victims.append(victim)
            rows -= victim.rows
            tokens -= victim.cost_tokens
        else:
            if rows + candidate.rows > c.max_batch_rows or tokens + candidate.cost_tokens > c.max_latent_tokens:
                return None
        if not victims or len(victims) > c.max_paused:
            return None
        served = self.predict(now, [*kept, candidate], ())
        finish = served.finish.get(candidate.request_id, math.inf)
        if finish > candidate.deadline + TOLERANCE_S:
            return None
        for victim in victims:  # an aged best-effort request is protected by the deadline it aged into
            own = victim.remaining_steps * self.step_s([*kept, victim]) + self.profile.decode_s(victim.tokens_per_row, 1)
            deadline = victim.effective_deadline
            if deadline is not None and finish + own > deadline + TOLERANCE_S:
                return None
        for m in kept:
            if m.deadline is not None and served.finish.get(m.request_id, math.inf) > m.deadline + TOLERANCE_S:
                return None
        return victims

    def must_decode(self, now: float, step_s: float, waiting: Sequence[Request]) -> bool:
        """Whether a finished image can wait no longer for companions in its decode batch."""
        c = self.config
        if len(waiting) >= c.max_decode_batch:
            return True
        for r in waiting:
            if r.decode_waits >= c.max_decode_wait_steps:
                return True
            if r.deadline is not None:
                later = now + step_s + self.profile.decode_s(r.tokens_per_row, len(waiting) + 1)
                if later > r.deadline - step_s:  # keep one step of margin for prediction error
                    return True
        return False
