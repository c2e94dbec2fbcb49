"""The latency profile: its arithmetic, its JSON cache, and the start-up sweep through the runner."""

from __future__ import annotations

import json

import pytest

from glideserve import Engine
from glideserve.config import EngineConfig
from glideserve.engine import profiling
from glideserve.runner.profiler import row_counts
from glideserve.scheduler.profile import LatencyProfile, PiecewiseLinear


def test_piecewise_linear_interpolates_and_extends():
    curve = PiecewiseLinear({2: 0.02, 4: 0.03, 8: 0.07})
    assert curve(1) == 0.02  # below the first point: its value (a fixed per-call cost)
    assert curve(3) == pytest.approx(0.025)
    linear = PiecewiseLinear({2: 0.02, 4: 0.03, 8: 0.05})
    assert linear(16) == pytest.approx(0.05 + 0.005 * 8)  # past the last point: the last segment's slope
    assert curve(16) == pytest.approx(0.03 * 4)  # never steeper than linear scaling from a measured point
    assert PiecewiseLinear({4: 0.04})(8) == pytest.approx(0.08)  # one point: proportional
    assert PiecewiseLinear()(5) == 0.0
    curve.observe(4, 0.13, alpha=0.5)
    assert curve.points[4] == pytest.approx(0.08)
    curve.observe(6, 0.1, alpha=1.0)  # a new point is inserted, then moved
    assert curve.points[6] == pytest.approx(0.1) and list(curve.points) == [2, 4, 6, 8]


def test_profile_round_trips_through_json_and_estimates_unseen_sizes():
    profile = LatencyProfile(steps={64: PiecewiseLinear({1: 0.01, 16: 0.05})},
                             decode={64: PiecewiseLinear({1: 0.008})}, prefill=PiecewiseLinear({1: 0.004}))
    again = LatencyProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again.to_json() == profile.to_json()
    # 4 rows at 256 tokens cost what 16 rows at 64 tokens cost, until that size is observed
    assert profile.group_s(256, 4) == pytest.approx(0.05)
    assert profile.step_s([(64, 16), (256, 4)]) == pytest.approx(0.1)
    profile.observe_group(256, 4, 0.2)  # first sight: the 64-token curve, calibrated to this point
    assert profile.group_s(256, 4) == pytest.approx(0.2)
    assert profile.group_s(64, 16) == pytest.approx(0.05)  # other sizes untouched
    with pytest.raises(ValueError, match="format"):
        LatencyProfile.from_json({"format": 99})


def test_row_counts():
    assert row_counts(1) == [1]
    assert row_counts(16) == [1, 2, 4, 8, 16]
    assert row_counts(12) == [1, 2, 4, 8, 12]


def test_start_up_sweep_measures_every_stage_and_is_cached(tiny_sd3_dir, tmp_path, monkeypatch):
    cache = tmp_path / "profiles.json"
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=4, profile=True,
                                    profile_cache=str(cache), profile_sizes=((32, 32), (16, 32)))
    profile = engine.core.scheduler.profile
    spec = engine.core.spec
    for height, width in ((32, 32), (16, 32)):
        steps = profile.steps[spec.tokens_per_row(height, width)]
        assert list(steps.points) == [1, 2, 4] and all(s > 0 for s in steps.points.values())
        assert profile.decode[spec.tokens_per_row(height, width)].points
    assert profile.prefill.points and len(engine.core.runner.batch) == 0  # synthetic requests freed
    assert not engine.core.runner.encoder._cache  # and their prompts forgotten
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all("32x" in key or "x32" in key for key in entries)

    calls = []
    monkeypatch.setattr(profiling, "measure_size", lambda *a, **k: calls.append(a) or LatencyProfile())
    again = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=4, profile=True,
                                   profile_cache=str(cache), profile_sizes=((32, 32), (16, 32)))
    assert not calls  # both sizes came from the cache
    assert again.core.scheduler.profile.to_json() == profile.to_json()
    Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=8, profile=True,
                           profile_cache=str(cache), profile_sizes=((32, 32),))
    assert len(calls) == 1  # another batch budget is another key


def test_an_unreadable_cache_is_reported_and_replaced(tiny_sd3_dir, tmp_path, caplog):
    cache = tmp_path / "profiles.json"
    cache.write_text("{not json")
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, max_batch_rows=2, profile=True,
                                    profile_cache=str(cache))
    assert "ignoring unreadable latency profile cache" in caplog.text
    assert engine.core.scheduler.profile.measured
    assert len(json.loads(cache.read_text())) == 1


def test_without_a_profile_the_engine_learns_from_its_steps(tiny_sd3_dir):
    from glideserve import GenerationParams

    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    profile = engine.core.scheduler.profile
    assert not profile.measured and profile.step_s([(16, 2)]) == 0.0
    engine.generate([GenerationParams("a", num_inference_steps=3, seed=0, height=32, width=32)])
    assert profile.group_s(engine.core.spec.tokens_per_row(32, 32), 2) > 0
    assert profile.decode and profile.prefill


def test_engine_config_validates_profile_and_policy_options():
    with pytest.raises(ValueError, match="scheduling policy"):
        EngineConfig.from_kwargs(policy="lifo")
    with pytest.raises(ValueError, match="drop_late_after"):
        EngineConfig.from_kwargs(drop_late_after=-1)
    with pytest.raises(ValueError, match="max_paused"):
        EngineConfig.from_kwargs(max_paused=-2)


def test_a_slowed_down_point_never_makes_a_bigger_batch_look_cheaper_or_dearer_than_linear():
    # 8 rows measured while another process ran: read as no slower than 16 rows, and
    # no slower than twice 4 rows.
    curve = PiecewiseLinear({1: 0.03, 2: 0.013, 4: 0.02, 8: 0.5, 16: 0.2})
    values = [curve(x) for x in range(1, 25)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert curve(1) == pytest.approx(0.013) and curve(8) == pytest.approx(0.04) and curve(16) == pytest.approx(0.08)
    # The last point slowed down (nothing later to compare with): bounded by linear scaling.
    spiked = PiecewiseLinear({1: 0.0068, 2: 0.0098, 4: 0.0279, 8: 0.0598, 16: 0.9395})
    assert spiked(16) == pytest.approx(8 * 0.0098)  # eight times the 2-row step
    curve.observe(8, 0.03, alpha=1.0)  # online updates move the raw point; the bounds still apply
    assert curve.points[8] == pytest.approx(0.03) and curve(8) == pytest.approx(0.03)


def test_a_uniform_slowdown_seen_at_one_count_raises_every_count():
    # Only 16 rows run under load; the other points keep their fast start-up values. Without the
    # whole-curve update the bounds would cap 16 rows at 4 x the 4-row point (4 x 0.012 s).
    profile = LatencyProfile(steps={64: PiecewiseLinear({1: 0.006, 2: 0.008, 4: 0.012, 8: 0.021, 16: 0.041})})
    for _ in range(60):
        profile.observe_group(64, 16, 0.082)  # twice as slow
    assert profile.group_s(64, 16) == pytest.approx(0.082, rel=0.02)
    for rows, fast in ((1, 0.006), (4, 0.012), (8, 0.021)):
        assert 1.7 < profile.group_s(64, rows) / fast <= 2.0  # mostly followed, never overshot
    curve = PiecewiseLinear({1: 0.01, 2: 0.02})
    curve.observe(2, 10.0, alpha=0.0, drift=1.0)  # a stalled step rescales by at most MAX_DRIFT_RATIO
    assert curve.points == {1: pytest.approx(0.04), 2: pytest.approx(0.08)}
