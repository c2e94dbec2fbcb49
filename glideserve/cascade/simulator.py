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

from glideserve.cascade import POLICIES, allocator
from glideserve.cascade.profiles import CascadeProfile, ModelProfile

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
    # glideserve's rule on top of DiffServe's: refuse at arrival a query predicted to end past its SLO (less
    # this margin of it), and answer with the light image an escalation the heavy model would finish late.
    admission: bool = False
    admission_margin: float = 0.15

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
class SimQuery:
    """One simulated query: when it arrived and the confidence the discriminator will give its light image."""

    arrival: float
    confidence: float


def draw_queries(profile: CascadeProfile, config: SimulationConfig, arrivals: list[float],
                 confidences: list[float] | None) -> list[SimQuery]:
    """One query per arrival with its discriminator confidence (default: drawn from f(t), seeded)."""
    if confidences is None:
        rng = np.random.default_rng(config.seed)
        confidences = [profile.escalation.confidence_at(u) for u in rng.random(len(arrivals))]
    if len(confidences) != len(arrivals):
        raise ValueError("need one confidence per arrival")
    return [SimQuery(t, conf) for t, conf in zip(arrivals, confidences)]


class RunTally:
    """What a run counts, shared by both simulators: outcomes by the second each query arrived in,
    the plan in force each second, and each served query's latency."""

    def __init__(self, arrivals: list[float], slo_s: float, drop_factor: float):
        self.slo_s, self.drop_factor = slo_s, drop_factor
        self.seconds = int(math.ceil(arrivals[-1])) + 1 if arrivals else 1
        self.timeline = {k: [0.0] * self.seconds for k in ("arrivals", "on_time", "late", "dropped", "threshold",
                                                           "light_workers", "demand")}
        self.counts = {"on_time": 0, "late": 0, "dropped": 0}
        self.served = {LIGHT: 0, HEAVY: 0}
        self.latencies: list[float] = []
        self._filled = [False] * self.seconds
        for t in arrivals:
            self.timeline["arrivals"][self.second(t)] += 1

    def second(self, t: float) -> int:
        return min(self.seconds - 1, int(t))

    def finish(self, q: SimQuery, t: float, role: str) -> None:
        self.latencies.append(t - q.arrival)
        key = "on_time" if t - q.arrival <= self.slo_s + 1e-9 else "late"
        self.counts[key] += 1
        self.served[role] += 1
        self.timeline[key][self.second(q.arrival)] += 1

    def drop(self, q: SimQuery) -> None:
        self.counts["dropped"] += 1
        self.timeline["dropped"][self.second(q.arrival)] += 1

    def take_batch(self, queue: deque, model: ModelProfile, cap: int, now: float) -> list[SimQuery]:
        """Up to ``cap`` queries from the head of ``queue``, dropping each that would end past
        ``drop_factor`` x SLO (DiffServe's worker rule)."""
        batch: list[SimQuery] = []
        while queue and len(batch) < min(cap, model.max_batch):
            q = queue.popleft()
            if now - q.arrival + model.latency(len(batch) + 1) > self.drop_factor * self.slo_s:
                self.drop(q)
            else:
                batch.append(q)
        return batch

    def admits(self, q: SimQuery, now: float, queued: int, model: ModelProfile, cap: int, workers: int,
               speed: float, margin: float) -> bool:
        """Whether ``q`` is predicted to end within its SLO (less ``margin`` of it) behind ``queued`` queries
        (waiting or running) on ``workers`` workers of ``model`` running batches of ``cap`` at ``speed`` (1: a whole worker)."""
        if workers < 1 or speed <= 0:
            return False
        cap = max(1, min(cap, model.max_batch))
        rounds = queued // (workers * cap) + 1
        finish = now + rounds * model.latency(min(cap, queued + 1)) / speed
        return finish - q.arrival <= (1.0 - margin) * self.slo_s

    def note_plan(self, t: float, threshold: float, light_share: float, demand: float) -> None:
        s = self.second(t)
        self.timeline["threshold"][s] = threshold
        self.timeline["light_workers"][s] = light_share
        self.timeline["demand"][s] = demand
        self._filled[s] = True

    def result(self, policy: str, workers: int, quality: dict[str, float]) -> SimulationResult:
        for s in range(1, self.seconds):  # seconds without an event keep the plan in force
            if not self._filled[s]:
                for key in ("threshold", "light_workers", "demand"):
                    self.timeline[key][s] = self.timeline[key][s - 1]
        total = int(sum(self.timeline["arrivals"]))
        return SimulationResult(policy, workers, total, self.counts["on_time"], self.counts["late"],
                                self.counts["dropped"], self.served, self.timeline, quality, self.latencies)


def served_quality(profile: CascadeProfile, served: dict[str, int]) -> dict[str, float]:
    """The share answered by the heavy model, and each metric of the profile's per-model quality averaged
    over the queries each model served."""
    total = sum(served.values())
    names = {LIGHT: profile.light.name, HEAVY: profile.heavy.name}
    metrics = set.intersection(*(set(profile.quality.get(n, {})) for n in names.values()))
    out = {"heavy_share": served[HEAVY] / total if total else 0.0}
    for metric in sorted(metrics):
        out[metric] = sum(served[r] * profile.quality[names[r]][metric] for r in served) / total if total else 0.0
    return out


def complete_batch(tally: RunTally, batch: list[SimQuery], role: str, now: float, threshold: float, policy: str,
                   heavy_queue: deque, heavy_admits) -> None:
    """Route each query of a batch that finished at ``now``: a light answer below ``threshold`` goes on to
    the heavy queue (or, when ``heavy_admits(q)`` says the heavy model would be late, the light image
    answers it); every other query is answered by ``role``."""
    for q in batch:
        if role == LIGHT and policy != "all-light" and q.confidence < threshold:
            if heavy_admits(q):
                heavy_queue.append(q)
            else:
                tally.finish(q, now, LIGHT)
        else:
            tally.finish(q, now, role)


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
        queries = draw_queries(p, c, arrivals, confidences)
        tally = RunTally(arrivals, p.slo_s, c.drop_factor)
        queues = {LIGHT: deque(), HEAVY: deque()}
        roles = [LIGHT] * c.workers
        busy_until = [0.0] * c.workers
        in_flight = {LIGHT: 0, HEAVY: 0}
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

        def admits(q: SimQuery, now: float, role: str) -> bool:
            if not c.admission:
                return True
            model = p.light if role == LIGHT else p.heavy
            workers = roles.count(role)
            cap = plan.light_batch if role == LIGHT else plan.heavy_batch
            ahead = len(queues[role]) + in_flight[role]
            return tally.admits(q, now, ahead, model, cap, workers, 1.0, c.admission_margin)

        def dispatch(now: float):
            for w in range(c.workers):
                if busy_until[w] > now:
                    continue
                role = roles[w]
                model = p.light if role == LIGHT else p.heavy
                batch = tally.take_batch(queues[role], model, plan.light_batch if role == LIGHT else plan.heavy_batch,
                                         now)
                if batch:
                    busy_until[w] = now + model.latency(len(batch))
                    in_flight[role] += len(batch)
                    push(busy_until[w], "done", (w, role, batch))

        apply(plan)
        for q in queries:
            push(q.arrival, "arrival", q)
        if queries:
            push(c.interval_s, "replan")
        seen_since_replan = 0
        while events:
            now, _, kind, payload = heapq.heappop(events)
            if kind == "arrival":
                seen_since_replan += 1
                role = HEAVY if c.policy == "all-heavy" else LIGHT
                if admits(payload, now, role):
                    queues[role].append(payload)
                else:
                    tally.drop(payload)  # refused at arrival
            elif kind == "done":
                _, role, batch = payload
                in_flight[role] -= len(batch)
                complete_batch(tally, batch, role, now, plan.threshold, c.policy, queues[HEAVY],
                               lambda q: admits(q, now, HEAVY))
            else:
                demand = self.estimator.update(seen_since_replan, c.interval_s)
                seen_since_replan = 0
                apply(self._plan(demand))
                if events:  # arrivals or batches still to come
                    push(now + c.interval_s, "replan")
            tally.note_plan(now, plan.threshold, plan.light_workers, self.estimator.planned())
            dispatch(now)
        for queue in queues.values():  # only possible when no worker of that model was left
            while queue:
                tally.drop(queue.popleft())
        return tally.result(c.policy, c.workers, served_quality(p, tally.served))


def simulate(profile: CascadeProfile, arrivals: list[float], config: SimulationConfig,
             confidences: list[float] | None = None) -> SimulationResult:
    """One policy over one trace (arrival offsets in seconds, sorted)."""
    if config.shared_machine:
        from glideserve.cascade.shared_machine import SharedMachineSimulator

        return SharedMachineSimulator(profile, config).run(list(arrivals), confidences)
    return CascadeSimulator(profile, config).run(list(arrivals), confidences)
