"""Summary arithmetic over per-request records, and the matmul peak that MFU is measured against.

Definitions (every figure in a summary follows these):

- latency: client-measured send-to-response seconds of requests that returned an image;
  percentiles use linear interpolation between order statistics (numpy's default).
- wall time: from the start of the run to the last response or the last scheduled
  arrival, whichever is later.
- outcomes: on time / late / refused / dropped (see ``RequestRecord``); every request
  has exactly one.
- SLO attainment: on time / all requests (late, refused and dropped count against it).
- late share of served: late images / images returned (what a client that got an
  image saw); refusal wait: send-to-answer seconds of refused requests (how fast a
  client learns to go elsewhere).
- goodput: images finished within their SLO per minute of wall time; throughput:
  images returned (late ones included) per second and per minute of wall time.
- per-second outcomes: counts of each outcome by the second in which requests were
  scheduled to arrive, as in DiffServe's plots.
- per class (mixed workloads): the same counts, attainment and served latency for
  each request class, whose SLO is scaled from its own isolated latency.
- achieved FLOP/s: model FLOPs per image x images returned / wall time; MFU: that
  over the fp32 matmul peak measured on the same machine.
"""

from __future__ import annotations

import math
import time

import numpy as np

from glideserve.bench.records import LATE, ON_TIME, REFUSED, STATUSES, RequestRecord

PERCENTILES = (50, 95, 99)


def distribution(values: list[float]) -> dict | None:
    """Mean, p50/p95/p99 and max of ``values``; ``None`` when there are none."""
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean())}
    out.update({f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES})
    out["max"] = float(arr.max())
    return out


def wall_time_s(records: list[RequestRecord]) -> float:
    """Seconds from the start of the run to the last response or scheduled arrival."""
    ends = [r.finished_s for r in records if r.finished_s is not None]
    ends += [r.scheduled_s for r in records]
    return max(ends, default=0.0)


def per_second_outcomes(records: list[RequestRecord]) -> list[dict]:
    """One entry per second of scheduled arrivals (empty seconds included) with outcome counts."""
    if not records:
        return []
    last = int(math.floor(max(r.scheduled_s for r in records)))
    rows = [{"second": s, **{status: 0 for status in STATUSES}} for s in range(last + 1)]
    for rec in records:
        rows[int(math.floor(rec.scheduled_s))][rec.status] += 1
    return rows


def summarize(records: list[RequestRecord], *, offered_rate: float | None = None,
              flops_per_image: float | None = None, peak_flops: float | None = None,
              cpu_seconds: float | None = None) -> dict:
    """The JSON summary of one load run; omitted figures are ``None`` with a reason in ``notes``.

    ``flops_per_image`` is the model's FLOPs for one image (given or estimated);
    ``cpu_seconds`` is the server process's CPU time over the run, when it was measured.
    """
    notes: list[str] = []
    completed = [r for r in records if r.completed]
    wall = wall_time_s(records)
    summary = {
        **outcome_figures(records),
        "wall_s": wall,
        "offered_rate": offered_rate,
        "throughput_rps": len(completed) / wall if wall > 0 else None,
        "throughput_img_per_min": 60.0 * len(completed) / wall if wall > 0 else None,
        "goodput_img_per_min": 60.0 * sum(r.status == ON_TIME for r in records) / wall if wall > 0 else None,
        "send_lag_s": distribution([r.send_lag_s for r in records if r.send_lag_s is not None]),
    }
    queued = [r.queued_s for r in completed if r.queued_s is not None]
    summary["queue_s"] = distribution(queued)
    if completed and not queued:
        notes.append("queueing time omitted: the server reported no queued_s in its responses' timings")

    if cpu_seconds is None:
        summary["cpu_s_per_image"] = None
        notes.append("CPU seconds per image omitted: the server was not started by the benchmark, "
                     "so its process CPU time could not be read")
    else:
        summary["server_cpu_s"] = cpu_seconds
        summary["cpu_s_per_image"] = cpu_seconds / len(completed) if completed else None

    summary.update(_flops_figures(completed, wall, flops_per_image, peak_flops, notes))
    summary["per_second"] = per_second_outcomes(records)
    classes = sorted({r.workload_class for r in records if r.workload_class})
    if len(classes) > 1:
        summary["by_class"] = {label: outcome_figures([r for r in records if r.workload_class == label])
                               for label in classes}
    summary["notes"] = notes
    return summary


def outcome_figures(records: list[RequestRecord]) -> dict:
    """Counts by outcome, SLO attainment, late share of served, served latency, refusal wait, SLO."""
    n = len(records)
    counts = {status: sum(r.status == status for r in records) for status in STATUSES}
    completed = [r for r in records if r.completed]
    late_served = sum(r.status == LATE for r in completed)
    return {
        "requests": n,
        **counts,
        "completed": len(completed),
        "slo_attainment": counts[ON_TIME] / n if n else None,
        "late_share_of_served": late_served / len(completed) if completed else None,
        "latency_s": distribution([r.latency_s for r in completed]),
        "refusal_wait_s": distribution([r.answer_s for r in records if r.status == REFUSED and r.answer_s is not None]),
        "slo_s": distribution([r.slo_s for r in records if r.slo_s is not None]),
    }


def _flops_figures(completed: list[RequestRecord], wall: float, flops_per_image: float | None,
                   peak_flops: float | None, notes: list[str]) -> dict:
    out = {"flops_per_image": flops_per_image, "achieved_flops": None, "peak_flops": peak_flops, "mfu": None}
    if flops_per_image is None:
        notes.append("FLOP/s and MFU omitted: model FLOPs per image are unknown "
                     "(pass --flops-per-image, or start the servers with --model so the benchmark counts them)")
        return out
    if wall > 0:
        out["achieved_flops"] = flops_per_image * len(completed) / wall
        if peak_flops:
            out["mfu"] = out["achieved_flops"] / peak_flops
        else:
            notes.append("MFU omitted: no matmul peak was measured")
    return out


def measure_matmul_peak_flops(size: int = 1024, min_time_s: float = 1.0, repeats: int = 3) -> float:
    """Best sustained fp32 FLOP/s of ``size x size`` matmuls on this process's torch threads.

    Runs ``repeats`` timed loops of at least ``min_time_s`` / ``repeats`` seconds each
    after a warm-up and keeps the fastest, since background load only ever slows it.
    """
    import torch

    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    out = torch.empty(size, size, dtype=torch.float32)
    torch.matmul(a, b, out=out)
    flops_per_matmul = 2.0 * size**3
    best = 0.0
    for _ in range(repeats):
        iterations = 0
        start = time.perf_counter()
        while True:
            torch.matmul(a, b, out=out)
            iterations += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s / repeats:
                break
        best = max(best, iterations * flops_per_matmul / elapsed)
    return best
