"""The cascade on one machine whose step time the two models share, as ``glideserve serve --cascade`` runs it.

Each model runs at most one batch at a time (its requests batch together). While both have
a batch in flight the machine's time is split by the plan's shares (a batch then progresses
at its share of full speed); a model running alone gets the whole machine, as the engine's
fair-share scheduler gives it. Shares, threshold and batch sizes come from the same MILP as
the live controller (one machine: continuous shares summing to at most 1). Queries carry a
discriminator confidence as in :mod:`glideserve.cascade.simulator`, whose drop rule, SLO
accounting and result type this shares, so the two can be compared with a live run.
"""

from __future__ import annotations

import math
from collections import deque

from glideserve.cascade import allocator
from glideserve.cascade.profiles import CascadeProfile
from glideserve.cascade.simulator import (HEAVY, LIGHT, RunTally, SimulationConfig, SimulationResult,
                                          best_single_model_batch, complete_batch, draw_queries, served_quality)


class SharedMachineSimulator:
    """Processor sharing between a light and a heavy model on one machine; ``run`` as CascadeSimulator's."""

    def __init__(self, profile: CascadeProfile, config: SimulationConfig):
        if not config.shared_machine:
            raise ValueError("SharedMachineSimulator needs SimulationConfig(shared_machine=True)")
        self.profile = profile
        self.config = config
        self.estimator = allocator.DemandEstimator(config.ewma_alpha, config.headroom)

    def _plan(self, demand: float) -> tuple[float, dict[str, float], dict[str, int]]:
        """Threshold, step-time shares and batch caps for ``demand``."""
        p, c = self.profile, self.config
        least = allocator.MIN_SHARE
        if c.policy == "all-light":
            return 0.0, {LIGHT: 1.0, HEAVY: least}, {LIGHT: best_single_model_batch(p.light, p.slo_s), HEAVY: 1}
        if c.policy == "all-heavy":
            return 1.0, {LIGHT: least, HEAVY: 1.0}, {LIGHT: 1, HEAVY: best_single_model_batch(p.heavy, p.slo_s)}
        fixed = c.static_threshold if c.policy == "static" else None
        plan = allocator.solve(p, demand, 1.0, fixed_threshold=fixed)
        light_share, heavy_share = allocator.step_shares(plan)
        shares = {LIGHT: light_share, HEAVY: heavy_share}
        return plan.threshold, shares, {LIGHT: plan.light_batch, HEAVY: plan.heavy_batch}

    def run(self, arrivals: list[float], confidences: list[float] | None = None) -> SimulationResult:
        c, p = self.config, self.profile
        queries = deque(draw_queries(p, c, arrivals, confidences))
        tally = RunTally(arrivals, p.slo_s, c.drop_factor)
        queues = {LIGHT: deque(), HEAVY: deque()}
        running: dict[str, list] = {}  # role -> [batch, remaining seconds at full speed]
        models = {LIGHT: p.light, HEAVY: p.heavy}
        threshold, shares, caps = self._plan(0.0)
        next_replan = c.interval_s
        seen = 0
        now = 0.0

        def rates() -> dict[str, float]:
            if len(running) < 2:
                return {role: 1.0 for role in running}
            total_share = shares[LIGHT] + shares[HEAVY]
            return {role: shares[role] / total_share for role in running}

        def dispatch(t: float) -> None:
            for role in (LIGHT, HEAVY):
                if role not in running and queues[role]:
                    batch = tally.take_batch(queues[role], models[role], caps[role], t)
                    if batch:
                        running[role] = [batch, models[role].latency(len(batch))]

        def admits(q, t: float, role: str) -> bool:
            if not c.admission:
                return True
            speed = shares[role] / (shares[LIGHT] + shares[HEAVY])
            ahead = len(queues[role]) + (len(running[role][0]) if role in running else 0)
            return tally.admits(q, t, ahead, models[role], caps[role], 1, speed, c.admission_margin)

        def finish(role: str, t: float) -> None:
            complete_batch(tally, running.pop(role)[0], role, t, threshold, c.policy, queues[HEAVY],
                           lambda q: admits(q, t, HEAVY))

        while queries or running or any(queues.values()):
            r = rates()
            completion = min((now + work / r[role] for role, (_, work) in running.items()), default=math.inf)
            arrival = queries[0].arrival if queries else math.inf
            t = min(completion, arrival, next_replan if (queries or running) else math.inf)
            if t == math.inf:  # queued work no model can take: count it dropped
                for queue in queues.values():
                    while queue:
                        tally.drop(queue.popleft())
                break
            for role in running:
                running[role][1] -= (t - now) * r[role]
            now = t
            for role in [role for role, (_, work) in running.items() if work <= 1e-9]:
                finish(role, now)
            while queries and queries[0].arrival <= now:
                q, role = queries.popleft(), HEAVY if c.policy == "all-heavy" else LIGHT
                seen += 1
                if admits(q, now, role):
                    queues[role].append(q)
                else:
                    tally.drop(q)  # refused at arrival
            if now >= next_replan:
                demand = self.estimator.update(seen, c.interval_s)
                seen = 0
                threshold, shares, caps = self._plan(demand)
                next_replan += c.interval_s
            tally.note_plan(now, threshold, shares[LIGHT] / (shares[LIGHT] + shares[HEAVY]), self.estimator.planned())
            dispatch(now)
        return tally.result(c.policy, 1, served_quality(p, tally.served))
