"""A discrete-event simulation of a cascade on N workers, driven by an arrival trace.

Each worker runs one model at a time and pulls batches from that model's queue (a pull
model: the same as a load balancer that always picks an idle worker). A batch of n takes the
profile's latency for the smallest profiled size >= n. Every ``interval_s`` the policy
re-plans: the allocator's MILP (:func:`glideserve.cascade.allocator.solve`) on an EWMA of
the demand seen (x headroom) gives the threshold, the light/heavy worker split and the batch
sizes. A worker that changes model finishes its batch first.

Queries carry a discriminator confidence drawn from the profile's f(t) (inverse-CDF
sampling, deterministic per seed); a light result whose confidence is below the current
threshold goes on to the heavy queue. As in DiffServe, a worker drops a query whose elapsed
time plus the batch it would join exceeds ``drop_factor`` x SLO; a query that completes after
its SLO is late. Both count as SLO violations.

Policies: ``milp`` (threshold and split re-planned), ``static`` (threshold fixed, split
re-planned for it), ``all-light`` (every worker light, nothing escalated), ``all-heavy``
(every worker heavy, no light pass).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from glideserve.cascade import allocator
from glideserve.cascade.profiles import CascadeProfile, ModelProfile

POLICIES = ("milp", "static", "all-light", "all-heavy")
LIGHT, HEAVY = "light", "heavy"


@dataclass(frozen=True)
class SimulationConfig:
    """How one simulated run is set up (validated on construction)."""

    workers: int
    policy: str
    interval_s: float = 5.0
    drop_factor: float = 1.5
    static_threshold: float = 0.5
    ewma_alpha: float = 0.5
    headroom: float = 1.2
    seed: int = 0
    shared_machine: bool = False  # one machine whose step time both models share (glideserve.cascade.shared_machine)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.shared_machine:
            if self.workers != 1:
                raise ValueError(f"a shared machine is one worker, got {self.workers}")
        elif self.workers < (2 if self.policy in ("milp", "static") else 1):
            raise ValueError(f"a {self.policy} cascade needs at least 2 workers, got {self.workers}")
        if not self.interval_s > 0 or not self.drop_factor >= 1.0:
            raise ValueError("interval_s must be > 0 and drop_factor >= 1")
        if not 0.0 <= self.static_threshold <= 1.0:
            raise ValueError(f"static_threshold must lie in [0, 1], got {self.static_threshold}")


@dataclass
class SimulationResult:
    """Totals and a per-second timeline (index = second since the first arrival)."""

    policy: str
    workers: int
    queries: int
    on_time: int
    late: int
    dropped: int
    served_by: dict[str, int]
    timeline: dict[str, list[float]] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # arrival to answer of each served query, in order

    @property
    def violation_ratio(self) -> float:
        return (self.late + self.dropped) / self.queries if self.queries else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "workers": self.workers, "queries": self.queries, "on_time": self.on_time,
                "late": self.late, "dropped": self.dropped, "violation_ratio": round(self.violation_ratio, 5),
                "served_by": self.served_by, "quality": self.quality,
                "latency_p50_s": round(float(np.percentile(self.latencies, 50)), 4) if self.latencies else None,
                "latency_p99_s": round(float(np.percentile(self.latencies, 99)), 4) if self.latencies else None,
                "timeline": self.timeline}


def best_single_model_batch(model: ModelProfile, slo_s: float) -> int:
    """The largest profiled batch whose stage latency fits the SLO (the smallest if none does)."""
    fitting = [b for b, s in zip(model.batch_sizes, model.latency_s) if allocator.STAGE_LATENCY_FACTOR * s <= slo_s]
    return fitting[-1] if fitting else model.batch_sizes[0]


@dataclass
class _Query:
    arrival: float
    confidence: float


@dataclass
class _Plan:
    threshold: float
    light_workers: int
    light_batch: int
    heavy_batch: int


class CascadeSimulator:
    """Runs one policy over one trace; ``run(arrivals)`` returns a :class:`SimulationResult`."""

    def __init__(self, profile: CascadeProfile, config: SimulationConfig):
        self.profile = profile
        self.config = config
        self.estimator = allocator.DemandEstimator(config.ewma_alpha, config.headroom)

    def _plan(self, demand: float) -> _Plan:
        p, c = self.profile, self.config
        if c.policy == "all-light":
            return _Plan(0.0, c.workers, best_single_model_batch(p.light, p.slo_s), p.heavy.batch_sizes[0])
        if c.policy == "all-heavy":
            return _Plan(1.0, 0, p.light.batch_sizes[0], best_single_model_batch(p.heavy, p.slo_s))
        fixed = c.static_threshold if c.policy == "static" else None
        plan = allocator.solve(p, demand, c.workers, integral=True, fixed_threshold=fixed)
        light, _ = allocator.split_workers(c.workers, plan)
        return _Plan(plan.threshold, light, plan.light_batch, plan.heavy_batch)

    def run(self, arrivals: list[float], confidences: list[float] | None = None) -> SimulationResult:
        """Simulate ``arrivals`` (sorted offsets in seconds); ``confidences`` gives each query's discriminator
        score (default: drawn from the profile's f(t))."""
        c, p = self.config, self.profile
        if confidences is None:
            rng = np.random.default_rng(c.seed)
            confidences = [p.escalation.confidence_at(u) for u in rng.random(len(arrivals))]
        if len(confidences) != len(arrivals):
            raise ValueError("need one confidence per arrival")
        queries = [_Query(t, conf) for t, conf in zip(arrivals, confidences)]
        seconds = int(math.ceil(arrivals[-1])) + 1 if arrivals else 1
        timeline = {k: [0.0] * seconds for k in ("arrivals", "on_time", "late", "dropped", "threshold",
                                                 "light_workers", "demand")}
        counts = {"on_time": 0, "late": 0, "dropped": 0}
        served = {LIGHT: 0, HEAVY: 0}
        latencies: list[float] = []
        queues = {LIGHT: deque(), HEAVY: deque()}
        roles = [LIGHT] * c.workers
        busy_until = [0.0] * c.workers
        plan = self._plan(0.0)
        events: list[tuple[float, int, str, object]] = []  # (time, tiebreak, kind, payload)
        order = 0

        def push(time: float, kind: str, payload=None):
            nonlocal order
            order += 1
            heapq.heappush(events, (time, order, kind, payload))

        def apply(new: _Plan):
            nonlocal plan
            plan = new
            for w in range(c.workers):
                roles[w] = LIGHT if w < new.light_workers else HEAVY

        def second(t: float) -> int:
            return min(seconds - 1, int(t))

        def finish(q: _Query, t: float, model: str):
            latencies.append(t - q.arrival)
            key = "on_time" if t - q.arrival <= p.slo_s + 1e-9 else "late"
            counts[key] += 1
            served[model] += 1
            timeline[key][second(q.arrival)] += 1

        def dispatch(now: float):
            for w in range(c.workers):
                if busy_until[w] > now:
                    continue
                role = roles[w]
                model = p.light if role == LIGHT else p.heavy
                cap = min(plan.light_batch if role == LIGHT else plan.heavy_batch, model.max_batch)
                batch: list[_Query] = []
                queue = queues[role]
                while queue and len(batch) < cap:
                    q = queue.popleft()
                    if now - q.arrival + model.latency(len(batch) + 1) > c.drop_factor * p.slo_s:
                        counts["dropped"] += 1
                        timeline["dropped"][second(q.arrival)] += 1
                        continue
                    batch.append(q)
                if batch:
                    done = now + model.latency(len(batch))
                    busy_until[w] = done
                    push(done, "done", (w, role, batch))

        apply(plan)
        for q in queries:
            push(q.arrival, "arrival", q)
            timeline["arrivals"][second(q.arrival)] += 1
        if queries:
            push(c.interval_s, "replan")
        seen_since_replan = 0
        filled = [False] * seconds
        while events:
            now, _, kind, payload = heapq.heappop(events)
            if kind == "arrival":
                seen_since_replan += 1
                queues[HEAVY if c.policy == "all-heavy" else LIGHT].append(payload)
            elif kind == "done":
                _, role, batch = payload
                for q in batch:
                    if role == LIGHT and q.confidence < plan.threshold and c.policy != "all-light":
                        queues[HEAVY].append(q)
                    else:
                        finish(q, now, role)
            else:
                demand = self.estimator.update(seen_since_replan, c.interval_s)
                seen_since_replan = 0
                apply(self._plan(demand))
                if events:  # arrivals or batches still to come
                    push(now + c.interval_s, "replan")
            s = second(now)
            timeline["threshold"][s] = plan.threshold
            timeline["light_workers"][s] = plan.light_workers
            timeline["demand"][s] = self.estimator.planned()
            filled[s] = True
            dispatch(now)
        for queue in queues.values():  # only possible when no worker of that model was left
            for q in queue:
                counts["dropped"] += 1
                timeline["dropped"][second(q.arrival)] += 1
        for s in range(1, seconds):  # seconds without an event keep the plan in force
            if not filled[s]:
                for key in ("threshold", "light_workers", "demand"):
                    timeline[key][s] = timeline[key][s - 1]
        return SimulationResult(c.policy, c.workers, len(queries), counts["on_time"], counts["late"],
                                counts["dropped"], served, timeline, self._quality(served), latencies)

    def _quality(self, served: dict[str, int]) -> dict[str, float]:
        """Each metric of the profile's per-model quality, averaged over the queries each model served."""
        total = sum(served.values())
        names = {LIGHT: self.profile.light.name, HEAVY: self.profile.heavy.name}
        metrics = set.intersection(*(set(self.profile.quality.get(n, {})) for n in names.values()))
        out = {"heavy_share": served[HEAVY] / total if total else 0.0}
        for metric in sorted(metrics):
            out[metric] = sum(served[r] * self.profile.quality[names[r]][metric] for r in served) / total if total else 0.0
        return out


def simulate(profile: CascadeProfile, arrivals: list[float], config: SimulationConfig,
             confidences: list[float] | None = None) -> SimulationResult:
    """One policy over one trace (arrival offsets in seconds, sorted)."""
    if config.shared_machine:
        from glideserve.cascade.shared_machine import SharedMachineSimulator

        return SharedMachineSimulator(profile, config).run(list(arrivals), confidences)
    return CascadeSimulator(profile, config).run(list(arrivals), confidences)
