"""DiffServe's allocation MILP, solved with scipy's HiGHS (``scipy.optimize.milp``).

Given demand D (queries/s), a light/heavy profile and f(t), choose

- the capacity each model gets: whole workers in a cluster (``integral=True``, at most
  ``capacity`` of them) or shares of one machine's step time (continuous, summing to at most 1);
- one batch size per model (one-hot over the profiled sizes);
- one threshold (one-hot over a grid of 201 values in [0, 1]);

such that light throughput >= D (every query passes the light model first), heavy throughput
>= D * f(t), and the latency a query can see, latency(b1) + queue1 + latency(b2) + queue2, stays
within the SLO; maximise the threshold (send as many queries to the heavy model as capacity allows).

Queueing delay by Little's law: at a planned throughput >= demand, a worker holds at most the
batch it runs plus one batch waiting, so a query waits at most one batch latency; each stage
therefore costs ``2 * latency(b)``. Capacity x batch-size products are linearised with one
variable per (model, batch size) pair, bounded by the one-hot choice.

When even the lightest plan cannot carry D, the throughput constraints get slack variables whose
cost dominates the objective: the solver then serves as much demand as possible, and the plan says
it is ``overloaded``. Likewise when no batch sizes fit the SLO (the measured latencies grew under
load, say): a slack on the latency row, priced above everything, makes the solver take the fastest
batches and keep planning the threshold and capacity, rather than fail and leave a stale plan. The same code sizes replicas in a cluster and workers in the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from glideserve.cascade.profiles import CascadeProfile

THRESHOLD_POINTS = 201
MIN_SHARE = 0.05  # the least share of step time a model gets on one machine (see step_shares)
STAGE_LATENCY_FACTOR = 2.0  # a batch's own latency plus at most one batch ahead of it (see module docstring)
_SLACK_COST = 1e3  # per query/s of unmet demand; outweighs any threshold gain (thresholds lie in [0, 1])


@dataclass(frozen=True)
class Allocation:
    """One solution: capacity, batch size and threshold per model, and what it promises."""

    threshold: float
    escalated_fraction: float
    light_capacity: float  # workers (cluster) or share of step time (one machine)
    heavy_capacity: float
    light_batch: int
    heavy_batch: int
    demand: float
    overloaded: bool  # the plan cannot carry ``demand`` (or fit the SLO); it does the best it can
    unmet_demand: float = 0.0
    over_slo_s: float = 0.0  # by how much even the fastest batches overrun the SLO

    def as_dict(self) -> dict:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def stage_latency(profile, index: int) -> float:
    return STAGE_LATENCY_FACTOR * profile.latency_s[index]


def solve(profile: CascadeProfile, demand: float, capacity: float = 1.0, *, integral: bool = False,
          thresholds: np.ndarray | None = None, fixed_threshold: float | None = None) -> Allocation:
    """The allocation for ``demand`` queries/s on ``capacity`` workers (``integral``) or one machine.

    ``fixed_threshold`` pins t (the static-cascade baseline: only capacity and batch sizes move).
    """
    if not demand >= 0 or not math.isfinite(demand):
        raise ValueError(f"demand must be a finite number >= 0, got {demand}")
    if not capacity > 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if fixed_threshold is not None:
        thresholds = np.array([fixed_threshold])
    if thresholds is None:
        thresholds, fractions = profile.escalation.grid(THRESHOLD_POINTS)
    else:
        fractions = np.array([profile.escalation(t) for t in thresholds])
    light, heavy = profile.light, profile.heavy
    n1, n2, nt = len(light.batch_sizes), len(heavy.batch_sizes), len(thresholds)
    # Variable layout: [z1 (n1) | z2 (n2) | u1 (n1) | u2 (n2) | y (nt) | slack1 | slack2 | late]
    # z: one-hot batch size; u: capacity at that batch size (<= capacity * z); y: one-hot threshold.
    z1, z2 = 0, n1
    u1, u2 = n1 + n2, 2 * n1 + n2
    y = 2 * (n1 + n2)
    s1, s2 = y + nt, y + nt + 1
    late = s2 + 1  # seconds by which the fastest batches still overrun the SLO (0 when any plan fits)
    size = late + 1

    rows, lower, upper = [], [], []

    def add(coefficients: dict[int, float], lo: float, hi: float) -> None:
        row = np.zeros(size)
        for index, value in coefficients.items():
            row[index] += value
        rows.append(row)
        lower.append(lo)
        upper.append(hi)

    add({z1 + k: 1.0 for k in range(n1)}, 1.0, 1.0)
    add({z2 + k: 1.0 for k in range(n2)}, 1.0, 1.0)
    add({y + j: 1.0 for j in range(nt)}, 1.0, 1.0)
    for k in range(n1):
        add({u1 + k: 1.0, z1 + k: -capacity}, -np.inf, 0.0)
    for k in range(n2):
        add({u2 + k: 1.0, z2 + k: -capacity}, -np.inf, 0.0)
    add({**{u1 + k: 1.0 for k in range(n1)}, **{u2 + k: 1.0 for k in range(n2)}}, -np.inf, capacity)
    add({**{u1 + k: light.throughput(k) for k in range(n1)}, s1: 1.0}, demand, np.inf)
    heavy_row = {u2 + k: heavy.throughput(k) for k in range(n2)}
    heavy_row.update({y + j: -demand * fractions[j] for j in range(nt)})
    heavy_row[s2] = 1.0
    add(heavy_row, 0.0, np.inf)
    latency = {z1 + k: stage_latency(light, k) for k in range(n1)}
    latency.update({z2 + k: stage_latency(heavy, k) for k in range(n2)})
    latency[late] = -1.0
    add(latency, -np.inf, profile.slo_s)

    cost = np.zeros(size)
    cost[y:y + nt] = -np.asarray(thresholds)  # milp minimises
    cost[s1] = cost[s2] = _SLACK_COST
    cost[late] = _SLACK_COST * 1e3  # a plan that fits the SLO always wins; else the fastest batches
    # A tiny price on capacity picks the leanest plan among equally good ones.
    cost[u1:u2 + n2] = 1e-6
    integrality = np.zeros(size)
    integrality[z1:u1] = 1
    integrality[y:y + nt] = 1
    if integral:
        integrality[u1:y] = 1
    upper_bounds = np.full(size, np.inf)
    upper_bounds[z1:u1] = 1
    upper_bounds[y:y + nt] = 1
    upper_bounds[u1:y] = capacity
    result = milp(cost, constraints=LinearConstraint(np.array(rows), lower, upper),
                  integrality=integrality, bounds=Bounds(np.zeros(size), upper_bounds))
    if result.x is None:
        raise RuntimeError(f"the allocation MILP found no solution ({result.message})")
    x = result.x
    k1 = int(np.argmax(x[z1:z1 + n1]))
    k2 = int(np.argmax(x[z2:z2 + n2]))
    j = int(np.argmax(x[y:y + nt]))
    unmet = float(x[s1] + x[s2])
    over_slo = float(x[late])
    return Allocation(
        threshold=float(thresholds[j]), escalated_fraction=float(fractions[j]),
        light_capacity=float(x[u1 + k1]), heavy_capacity=float(x[u2 + k2]),
        light_batch=light.batch_sizes[k1], heavy_batch=heavy.batch_sizes[k2], demand=float(demand),
        overloaded=unmet > 1e-6 or over_slo > 1e-6, unmet_demand=unmet, over_slo_s=over_slo)


def step_shares(allocation: Allocation) -> tuple[float, float]:
    """Light and heavy shares of one machine's step time for a plan, each at least ``MIN_SHARE``: a model
    the plan gives nothing still steps now and then (requests may name it directly)."""
    return max(MIN_SHARE, allocation.light_capacity), max(MIN_SHARE, allocation.heavy_capacity)


def split_workers(total: int, allocation: Allocation) -> tuple[int, int]:
    """Whole light / heavy worker counts for ``total`` workers: the plan's, with spare ones given to
    the heavy model (more heavy capacity only lowers heavy queueing)."""
    light = max(1, min(total - 1, int(round(allocation.light_capacity)))) if total > 1 else total
    return light, total - light


class DemandEstimator:
    """EWMA of the arrival rate, updated once per allocation interval (DiffServe: every 5 s, x1.2 headroom)."""

    def __init__(self, alpha: float = 0.5, headroom: float = 1.2):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.alpha = alpha
        self.headroom = headroom
        self.rate: float | None = None

    def update(self, arrivals: int, seconds: float) -> float:
        """Fold in ``arrivals`` seen over ``seconds``; returns the demand to plan for."""
        observed = arrivals / seconds
        self.rate = observed if self.rate is None else self.alpha * observed + (1 - self.alpha) * self.rate
        return self.planned()

    def planned(self) -> float:
        return 0.0 if self.rate is None else self.rate * self.headroom
