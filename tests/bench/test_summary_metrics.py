"""Summary arithmetic on hand-made records, where every figure can be worked out by hand."""

from __future__ import annotations

import pytest

from glideserve.bench.metrics import distribution, measure_matmul_peak_flops, per_second_outcomes, summarize
from glideserve.bench.records import RequestRecord, read_records_csv, write_records_csv


def _ok(i, scheduled, latency, slo=2.0, queued=None):
    status = "on_time" if latency <= slo else "late"
    return RequestRecord(index=i, prompt_id=i, scheduled_s=scheduled, status=status, sent_s=scheduled,
                         finished_s=scheduled + latency, completed=True, http_status=200, slo_s=slo,
                         queued_s=queued)


def _dropped(i, scheduled, status="dropped", answer_s=0.01):
    return RequestRecord(index=i, prompt_id=i, scheduled_s=scheduled, status=status, sent_s=scheduled,
                         finished_s=scheduled + answer_s, http_status=429 if status == "refused" else 503, slo_s=2.0)


def _records():
    # latencies 1, 2, 3, 4 (the last two late against a 2 s SLO) and one drop; the last
    # response comes at 1.5 + 4 = 5.5 s, the wall time.
    return [_ok(0, 0.0, 1.0, queued=0.1), _ok(1, 0.5, 2.0, queued=0.2), _ok(2, 1.0, 3.0, queued=0.3),
            _ok(3, 1.5, 4.0, queued=0.4), _dropped(4, 2.5)]


def test_distribution_uses_linear_interpolation():
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "p99": pytest.approx(3.97), "max": 4.0}
    assert distribution([]) is None


def test_summary_counts_goodput_throughput_and_slo_attainment():
    s = summarize(_records(), offered_rate=2.0, cpu_seconds=11.0)
    assert (s["requests"], s["on_time"], s["late"], s["refused"], s["dropped"], s["completed"]) == (5, 2, 2, 0, 1, 4)
    assert s["late_share_of_served"] == pytest.approx(2 / 4)
    assert s["wall_s"] == pytest.approx(5.5)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput_img_per_min"] == pytest.approx(60 * 2 / 5.5)
    assert s["throughput_img_per_min"] == pytest.approx(60 * 4 / 5.5)
    assert s["throughput_rps"] == pytest.approx(4 / 5.5)
    assert s["latency_s"]["p50"] == pytest.approx(2.5) and s["latency_s"]["max"] == 4.0
    assert s["queue_s"]["mean"] == pytest.approx(0.25)
    assert s["cpu_s_per_image"] == pytest.approx(11.0 / 4)
    assert s["offered_rate"] == 2.0


def test_per_second_outcomes_bucket_by_arrival_second_and_keep_empty_seconds():
    records = _records() + [_dropped(5, 4.2)]
    records.append(_dropped(6, 3.1, status="refused"))
    rows = per_second_outcomes(records)
    assert rows == [
        {"second": 0, "on_time": 2, "late": 0, "refused": 0, "dropped": 0},
        {"second": 1, "on_time": 0, "late": 2, "refused": 0, "dropped": 0},
        {"second": 2, "on_time": 0, "late": 0, "refused": 0, "dropped": 1},
        {"second": 3, "on_time": 0, "late": 0, "refused": 1, "dropped": 0},
        {"second": 4, "on_time": 0, "late": 0, "refused": 0, "dropped": 1},
    ]
    assert sum(r["on_time"] + r["late"] + r["refused"] + r["dropped"] for r in rows) == len(records)


def test_flops_and_mfu_from_given_flops_per_image():
    s = summarize(_records(), flops_per_image=1e9, peak_flops=1e10)
    assert s["achieved_flops"] == pytest.approx(4e9 / 5.5)
    assert s["mfu"] == pytest.approx(4e9 / 5.5 / 1e10)


def test_mfu_needs_a_peak():
    s = summarize(_records(), flops_per_image=1e9)
    assert s["achieved_flops"] == pytest.approx(4e9 / 5.5) and s["mfu"] is None
    assert any("no matmul peak" in note for note in s["notes"])


def test_unknown_figures_are_omitted_with_a_reason():
    records = [_ok(0, 0.0, 1.0)]
    s = summarize(records)
    assert s["mfu"] is None and s["achieved_flops"] is None and s["cpu_s_per_image"] is None
    assert s["queue_s"] is None
    notes = " ".join(s["notes"])
    assert "FLOPs per image are unknown" in notes and "CPU seconds" in notes and "queued_s" in notes


def test_empty_and_all_dropped_runs():
    s = summarize([_dropped(0, 0.0)])
    assert s["slo_attainment"] == 0.0 and s["latency_s"] is None and s["goodput_img_per_min"] == 0.0
    assert summarize([])["slo_attainment"] is None


def test_records_round_trip_through_csv(tmp_path):
    records = _records()
    write_records_csv(tmp_path / "r.csv", records)
    assert read_records_csv(tmp_path / "r.csv") == records
    header = (tmp_path / "r.csv").read_text().splitlines()[0]
    assert "latency_s" in header and "status" in header


def test_record_rejects_unknown_status():
    with pytest.raises(ValueError, match="status"):
        RequestRecord(index=0, prompt_id=0, scheduled_s=0.0, status="ok")


def test_matmul_peak_is_a_positive_rate():
    peak = measure_matmul_peak_flops(size=128, min_time_s=0.05, repeats=2)
    assert peak > 0


def test_refusal_wait_and_outcomes_per_class():
    def classed(record, label):
        record.workload_class = label
        return record

    records = [classed(_ok(0, 0.0, 1.0), "10 steps 64x64"), classed(_ok(1, 0.1, 3.0), "10 steps 64x64"),
               classed(_dropped(2, 0.2, status="refused", answer_s=0.004), "40 steps 64x64"),
               classed(_dropped(3, 0.3, status="refused", answer_s=0.002), "40 steps 64x64"),
               classed(_ok(4, 0.4, 1.5, slo=6.0), "40 steps 64x64")]
    s = summarize(records)
    assert s["refusal_wait_s"]["max"] == pytest.approx(0.004) and s["refusal_wait_s"]["p50"] == pytest.approx(0.003)
    fast, slow = s["by_class"]["10 steps 64x64"], s["by_class"]["40 steps 64x64"]
    assert (fast["on_time"], fast["late"], fast["refused"]) == (1, 1, 0)
    assert (slow["on_time"], slow["refused"], slow["requests"]) == (1, 2, 3)
    assert slow["slo_attainment"] == pytest.approx(1 / 3) and slow["late_share_of_served"] == 0
    assert "by_class" not in summarize(records[:2])  # one class: no breakdown
