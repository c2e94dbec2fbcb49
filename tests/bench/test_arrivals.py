"""Arrival processes: statistics of the Poisson process, shapes of the others, trace rescaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from glideserve.bench.arrivals import (Schedule, burst_arrivals, constant_arrivals, load_trace, make_schedule,
                                       poisson_arrivals, rescale)


def test_poisson_mean_gap_and_ks_against_exponential():
    rate, n = 4.0, 4000
    gaps = np.diff((0.0,) + poisson_arrivals(rate, count=n, seed=7).offsets)
    # mean of n exponential gaps: standard error (1/rate)/sqrt(n); allow 4 of them
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(n)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    # the same test rejects a process at the wrong rate, so it has the power to fail
    assert stats.kstest(gaps, "expon", args=(0, 1.2 / rate)).pvalue < 0.01


def test_poisson_by_duration_count_is_plausible_and_deterministic():
    rate, duration = 5.0, 400.0
    schedule = poisson_arrivals(rate, duration_s=duration, seed=11)
    expected = rate * duration
    assert abs(len(schedule) - expected) < 4 * math.sqrt(expected)
    assert schedule.offsets[-1] < duration
    assert list(schedule.offsets) == sorted(schedule.offsets)
    assert schedule == poisson_arrivals(rate, duration_s=duration, seed=11)
    assert schedule != poisson_arrivals(rate, duration_s=duration, seed=12)


def test_poisson_needs_exactly_one_of_count_and_duration():
    with pytest.raises(ValueError, match="exactly one"):
        poisson_arrivals(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        poisson_arrivals(1.0, count=3, duration_s=3.0)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, count=3)


def test_constant_and_bursts():
    assert constant_arrivals(2.0, count=4).offsets == (0.0, 0.5, 1.0, 1.5)
    assert constant_arrivals(2.0, duration_s=2.0).offsets == (0.0, 0.5, 1.0, 1.5)
    assert burst_arrivals(3, 10.0, 2).offsets == (0.0, 0.0, 0.0, 10.0, 10.0, 10.0)
    with pytest.raises(ValueError, match="burst_size"):
        burst_arrivals(0, 1.0, 1)


def _write_trace(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_loads_sorted_and_shifted(tmp_path):
    trace = _write_trace(tmp_path / "t.csv", ["arrival_ms,prompt_id", "1500,7", "1000,3", "1250.5,9"])
    schedule = load_trace(trace)
    assert schedule.offsets == pytest.approx((0.0, 0.2505, 0.5))
    assert schedule.prompt_ids == (3, 9, 7)


def test_trace_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"t.csv:3"):
        load_trace(_write_trace(tmp_path / "t.csv", ["0,1", "10,2", "oops"]))
    with pytest.raises(FileNotFoundError, match="arrival_ms,prompt_id"):
        load_trace(tmp_path / "missing.csv")


def test_rescale_hits_target_rate_and_keeps_shape(tmp_path):
    rng = np.random.default_rng(0)
    ms = np.cumsum(rng.exponential(250.0, size=400))  # ~4 req/s
    trace = _write_trace(tmp_path / "t.csv", [f"{t:.1f},{i}" for i, t in enumerate(ms)])
    original = load_trace(trace)
    scaled = rescale(original, target_rate=1.5)
    assert scaled.mean_rate == pytest.approx(1.5, rel=1e-9)
    ratio = np.asarray(scaled.offsets[1:]) / np.asarray(original.offsets[1:])
    assert np.allclose(ratio, ratio[0])  # a uniform stretch of time
    assert scaled.prompt_ids == original.prompt_ids


def test_rescale_then_cut_to_duration(tmp_path):
    trace = _write_trace(tmp_path / "t.csv", [f"{i * 100},{i}" for i in range(101)])  # 10 req/s over 10 s
    schedule = rescale(load_trace(trace), target_rate=5.0, duration_s=8.0)
    assert all(t < 8.0 for t in schedule.offsets)
    assert len(schedule) == 40  # 101 arrivals over 10 s stretched by 10.1/5: 0.202 s apart, 0 .. 7.88 s
    assert schedule.prompt_ids == tuple(range(40))
    only_cut = rescale(load_trace(trace), duration_s=2.0)
    assert len(only_cut) == 20


def test_trace_fitted_to_rate_and_duration_keeps_its_ramp(tmp_path):
    # A ramp: the rate grows linearly from ~1 to ~9 req/s over 100 s (like the MAF 1-to-8 qps trace).
    times = np.sqrt(np.linspace(0, 1, 500)) * 100_000
    trace = _write_trace(tmp_path / "ramp.csv", [f"{t:.1f},{i}" for i, t in enumerate(times)])
    schedule = make_schedule("trace", trace=trace, rate=2.0, duration_s=30.0, seed=3)
    assert len(schedule) == 60 and schedule.offsets[-1] < 30.0
    offsets = np.asarray(schedule.offsets)
    assert (offsets >= 15).sum() > 1.5 * (offsets < 15).sum()  # the later half still carries more load
    assert schedule == make_schedule("trace", trace=trace, rate=2.0, duration_s=30.0, seed=3)
    with pytest.raises(ValueError, match="lower --rate or --duration"):
        make_schedule("trace", trace=trace, rate=50.0, duration_s=30.0)


def test_schedule_validates():
    with pytest.raises(ValueError, match="sorted"):
        Schedule((1.0, 0.5))
    with pytest.raises(ValueError, match="unknown arrival"):
        make_schedule("gamma", rate=1.0, count=3)
    with pytest.raises(ValueError, match="needs rate"):
        make_schedule("poisson", count=3)
