"""The allocation MILP against brute force on small instances, f(t) from scores, and the profiles file."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from glideserve.cascade import allocator
from glideserve.cascade.profiles import CascadeProfile, EscalationProfile, ModelProfile, load_profiles

DIFFSERVE_PROFILES = Path(allocator.__file__).resolve().parents[1] / "data" / "profiles" / "diffserve_a100.json"


def _brute_force(profile: CascadeProfile, demand: float, capacity: float, integral: bool,
                 thresholds: np.ndarray) -> float | None:
    """The largest threshold some (batch sizes, capacities) can carry, or None: every combination tried."""
    best = None
    light, heavy = profile.light, profile.heavy
    for k1, k2, t in itertools.product(range(len(light.batch_sizes)), range(len(heavy.batch_sizes)), thresholds):
        latency = allocator.stage_latency(light, k1) + allocator.stage_latency(heavy, k2)
        if latency > profile.slo_s + 1e-9:
            continue
        need_light = demand / light.throughput(k1)
        need_heavy = demand * profile.escalation(t) / heavy.throughput(k2)
        if integral:
            need_light, need_heavy = math.ceil(need_light - 1e-9), math.ceil(need_heavy - 1e-9)
        if need_light + need_heavy <= capacity + 1e-9 and (best is None or t > best):
            best = float(t)
    return best


def _random_profile(rng: np.random.Generator) -> CascadeProfile:
    sizes = (1, 2, 4)
    light_base, heavy_base = rng.uniform(0.05, 0.3), rng.uniform(0.5, 2.0)
    light = ModelProfile("light", sizes, tuple(light_base * b ** rng.uniform(0.5, 1.0) for b in sizes))
    heavy = ModelProfile("heavy", sizes, tuple(heavy_base * b ** rng.uniform(0.5, 1.0) for b in sizes))
    cuts = np.sort(rng.uniform(0, 1, 3))
    escalation = EscalationProfile((0.25, 0.5, 0.75), tuple(float(c) for c in cuts))
    return CascadeProfile(light, heavy, escalation, slo_s=float(rng.uniform(2.5, 10.0)))


@pytest.mark.parametrize("integral", [True, False])
def test_milp_matches_brute_force_on_small_instances(integral):
    rng = np.random.default_rng(7 + integral)
    thresholds = np.linspace(0, 1, 11)
    checked = 0
    for _ in range(40):
        profile = _random_profile(rng)
        capacity = float(rng.integers(2, 6)) if integral else 1.0
        demand = float(rng.uniform(0.2, 4.0 if integral else 1.5))
        expected = _brute_force(profile, demand, capacity, integral, thresholds)
        plan = allocator.solve(profile, demand, capacity, integral=integral, thresholds=thresholds)
        if expected is None:
            assert plan.overloaded
        else:
            assert not plan.overloaded
            assert plan.threshold == pytest.approx(expected)
            # The plan itself is feasible.
            k1 = profile.light.batch_sizes.index(plan.light_batch)
            k2 = profile.heavy.batch_sizes.index(plan.heavy_batch)
            assert plan.light_capacity * profile.light.throughput(k1) >= demand - 1e-6
            assert plan.heavy_capacity * profile.heavy.throughput(k2) >= demand * plan.escalated_fraction - 1e-6
            assert plan.light_capacity + plan.heavy_capacity <= capacity + 1e-6
            if integral:
                assert plan.light_capacity == pytest.approx(round(plan.light_capacity))
            checked += 1
    assert checked >= 10  # the instances are not all overloaded or infeasible


def test_overload_serves_as_much_as_it_can_and_says_so():
    light = ModelProfile("light", (1, 2), (0.1, 0.15))
    heavy = ModelProfile("heavy", (1, 2), (1.0, 1.8))
    profile = CascadeProfile(light, heavy, EscalationProfile((0.5,), (0.5,)), slo_s=10.0)
    plan = allocator.solve(profile, demand=100.0, capacity=2, integral=True)
    assert plan.overloaded and plan.unmet_demand > 0
    assert plan.threshold == 0.0  # nothing to spare for the heavy model
    assert plan.light_capacity == 2


def test_more_capacity_never_lowers_the_threshold():
    profile = load_profiles(DIFFSERVE_PROFILES, "sd-turbo-1step", "sd1.5-50step", cascade="sdturbo")
    thresholds = [allocator.solve(profile, 20.0, workers, integral=True).threshold for workers in (4, 8, 16)]
    assert thresholds == sorted(thresholds) and thresholds[-1] > thresholds[0]


def test_fixed_threshold_pins_t_and_sizes_capacity_for_it():
    profile = load_profiles(DIFFSERVE_PROFILES, "sd-turbo-1step", "sd1.5-50step", cascade="sdturbo")
    plan = allocator.solve(profile, 10.0, 16, integral=True, fixed_threshold=0.02)
    assert plan.threshold == 0.02 and plan.escalated_fraction == pytest.approx(0.26)
    assert not plan.overloaded


def test_no_batch_size_within_the_slo_still_plans_with_the_fastest_batches():
    light = ModelProfile("light", (1, 2), (3.0, 3.5))
    heavy = ModelProfile("heavy", (1, 2), (3.0, 3.5))
    profile = CascadeProfile(light, heavy, EscalationProfile((0.5,), (0.5,)), slo_s=5.0)
    plan = allocator.solve(profile, 0.1)
    assert plan.overloaded and plan.over_slo_s == pytest.approx(2 * 3.0 + 2 * 3.0 - 5.0)
    assert (plan.light_batch, plan.heavy_batch) == (1, 1) and plan.threshold > 0


def test_escalation_profile_from_scores_counts_the_share_strictly_below_each_threshold():
    f = EscalationProfile.from_scores([0.1, 0.2, 0.2, 0.9], points=11)
    assert f(0.0) == 0.0
    assert f(0.2) == pytest.approx(0.25)  # 0.2 itself is not below 0.2
    assert f(0.3) == pytest.approx(0.75)
    assert f(1.0) == pytest.approx(1.0)
    assert f.confidence_at(0.5) <= 0.3


def test_escalation_profile_interpolates_and_rejects_decreasing_tables():
    f = EscalationProfile((0.1, 0.5), (0.4, 0.8))
    assert f(0.0) == 0.0 and f(0.05) == pytest.approx(0.2) and f(0.3) == pytest.approx(0.6) and f(1.0) == 1.0
    with pytest.raises(ValueError, match="decrease"):
        EscalationProfile((0.1, 0.5), (0.8, 0.4))


def test_profiles_file_loads_diffserve_schema(tmp_path):
    raw = {"batch_sizes": [1, 2, 4], "latency_ms": {"a": [100, 150, None], "b": [1000, 1800, 3500]},
           "escalated_fraction_at_threshold": {"a": {"0.1": 0.3}}, "slo_s": {"a_b": 5}}
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(raw))
    profile = load_profiles(path, "a", "b")
    assert profile.light.batch_sizes == (1, 2) and profile.light.latency(2) == pytest.approx(0.15)
    assert profile.heavy.latency(3) == pytest.approx(3.5)
    assert profile.slo_s == 5 and profile.escalation(0.1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no latency profile"):
        load_profiles(path, "a", "missing")


def test_demand_estimator_is_an_ewma_with_headroom():
    estimator = allocator.DemandEstimator(alpha=0.5, headroom=1.2)
    assert estimator.update(10, 5.0) == pytest.approx(2.4)
    assert estimator.update(20, 5.0) == pytest.approx(1.2 * 3.0)
