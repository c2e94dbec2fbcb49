"""The cascade simulator's arithmetic on hand-checked traces."""

from __future__ import annotations

import pytest

from glideserve.cascade.profiles import CascadeProfile, EscalationProfile, ModelProfile
from glideserve.cascade.simulator import SimulationConfig, simulate


def _profile(slo_s: float) -> CascadeProfile:
    light = ModelProfile("light", (1,), (1.0,))
    heavy = ModelProfile("heavy", (1,), (2.0,))
    return CascadeProfile(light, heavy, EscalationProfile((0.5,), (0.5,)), slo_s=slo_s,
                          quality={"light": {"judge": 0.5}, "heavy": {"judge": 1.0}})


def test_all_light_on_two_workers_counts_on_time_late_and_dropped_by_hand():
    # Two workers, 1 s per query, SLO 1.5 s, drop when elapsed + batch > 2.25 s.
    # t=0: q0, q1 start (done 1.0, on time). t=1: q2 (elapsed 0.5) and q3 (0.4) start, done 2.0: on time
    # (1.5 and 1.4). t=2: q4 (elapsed 1.3 + 1 > 2.25) is dropped; q5 (1.1 + 1 = 2.1) runs, done 3.0: late.
    arrivals = [0.0, 0.0, 0.5, 0.6, 0.7, 0.9]
    result = simulate(_profile(1.5), arrivals, SimulationConfig(2, "all-light"))
    assert (result.on_time, result.late, result.dropped) == (4, 1, 1)
    assert sorted(result.latencies) == pytest.approx([1.0, 1.0, 1.4, 1.5, 2.1])
    assert result.violation_ratio == pytest.approx(2 / 6)
    assert result.served_by == {"light": 5, "heavy": 0}
    assert result.timeline["arrivals"] == [6, 0]  # by the second each query arrived in
    assert result.quality["judge"] == pytest.approx(0.5)


def test_static_cascade_escalates_exactly_the_queries_below_the_threshold():
    # One light and one heavy worker. q0 (confidence 0.2 < 0.5) goes light 0-1 then heavy 1-3;
    # q1 (0.8) waits for the light worker, 1-2, and is answered there.
    result = simulate(_profile(10.0), [0.0, 0.0], SimulationConfig(2, "static", static_threshold=0.5),
                      confidences=[0.2, 0.8])
    assert result.served_by == {"light": 1, "heavy": 1}
    assert (result.on_time, result.late, result.dropped) == (2, 0, 0)
    assert result.quality["judge"] == pytest.approx(0.75) and result.quality["heavy_share"] == 0.5


def test_all_heavy_skips_the_light_model():
    result = simulate(_profile(10.0), [0.0, 0.0, 0.0], SimulationConfig(1, "all-heavy"))
    # One heavy worker, 2 s each: done at 2, 4, 6; all within 10 s.
    assert result.served_by == {"light": 0, "heavy": 3} and result.on_time == 3


def test_a_cascade_needs_two_workers_and_a_known_policy():
    with pytest.raises(ValueError, match="at least 2 workers"):
        SimulationConfig(1, "milp")
    with pytest.raises(ValueError, match="unknown policy"):
        SimulationConfig(4, "fastest")


def test_shared_machine_splits_time_by_share_while_both_models_run():
    from glideserve.cascade.shared_machine import SharedMachineSimulator

    # Static threshold 0.5 at demand 0: the MILP's shares; q0 escalates (0.2), q1 does not (0.8).
    # Light: q0 0-1 alone (1 s of work at full speed). Then heavy runs q0 (2 s of work) while light runs q1
    # (1 s): both progress at their shares until light finishes, then heavy runs alone.
    profile = _profile(10.0)
    config = SimulationConfig(1, "static", static_threshold=0.5, shared_machine=True)
    sim = SharedMachineSimulator(profile, config)
    threshold, shares, _ = sim._plan(0.0)
    light_rate = shares["light"] / (shares["light"] + shares["heavy"])
    result = sim.run([0.0, 0.0], confidences=[0.2, 0.8])
    assert result.served_by == {"light": 1, "heavy": 1} and result.on_time == 2
    # q1 (light, from 1 s) progresses at its share while q0 runs heavy; the machine never idles, so the
    # last answer comes when all 1 + 1 + 2 seconds of work are done.
    q1_done = 1.0 + 1.0 / light_rate
    assert sorted(result.latencies) == pytest.approx(sorted([q1_done, 4.0]))
    assert q1_done > 2.0  # slower than it would be alone


def test_shared_machine_alone_matches_one_worker():
    arrivals = [0.0, 0.0, 0.5, 0.6, 0.7, 0.9]
    one_worker = simulate(_profile(1.5), arrivals, SimulationConfig(1, "all-light"))
    shared = simulate(_profile(1.5), arrivals, SimulationConfig(1, "all-light", shared_machine=True))
    assert (shared.on_time, shared.late, shared.dropped) == (one_worker.on_time, one_worker.late, one_worker.dropped)


def test_admission_refuses_what_would_be_late_and_answers_late_escalations_with_the_light_image():
    # One light worker, 1 s per query, SLO 1.5 s less a 0.15 margin: a query may be predicted to end
    # within 1.275 s. q0 runs alone (1 s): admitted. q1 arrives behind it (2 s): refused at once.
    result = simulate(_profile(1.5), [0.0, 0.0], SimulationConfig(1, "all-light", admission=True))
    assert (result.on_time, result.late, result.dropped) == (1, 0, 1)
    # A static cascade (one light, one heavy worker; SLO 6 s, so 5.1 s with the margin), both queries
    # escalate: q0 light 0-1, heavy 1-3. q1 light 1-2; behind q0 the heavy model would end it at 6 s, so the
    # light image answers at 2 s. Without admission q1 goes on to the heavy model (3-5 s).
    config = SimulationConfig(2, "static", static_threshold=0.5, admission=True)
    cascade = simulate(_profile(6.0), [0.0, 0.0], config, confidences=[0.1, 0.1])
    assert cascade.served_by == {"light": 1, "heavy": 1} and cascade.on_time == 2
    assert sorted(cascade.latencies) == pytest.approx([2.0, 3.0])
    without = simulate(_profile(6.0), [0.0, 0.0], SimulationConfig(2, "static", static_threshold=0.5),
                       confidences=[0.1, 0.1])
    assert without.served_by == {"light": 0, "heavy": 2}
