"""GlideServe's latency tables: single requests spaced apart, and one batch sent at once.

``single``: ``count`` requests ``interval_s`` apart (20 x 1 s by default), so each
normally runs alone; ``batched``: ``batch_count`` requests at the same instant (24 by
default). Each is reported as total, queueing and inference latency (mean, p95, max)
and throughput; inference = total - the server's reported queueing time.
"""

from __future__ import annotations

from glideserve.bench.arrivals import burst_arrivals, constant_arrivals
from glideserve.bench.experiment import Workload
from glideserve.bench.metrics import distribution
from glideserve.bench.records import RequestRecord


def latency_workloads(single_count: int = 20, interval_s: float = 1.0, batch_count: int = 24) -> list[Workload]:
    """The two workloads; a count of 0 leaves that workload out."""
    workloads = []
    if single_count:
        workloads.append(Workload("single", constant_arrivals(1.0 / interval_s, count=single_count), 1.0 / interval_s))
    if batch_count:
        workloads.append(Workload("batched", burst_arrivals(batch_count, 1.0, 1), None))
    if not workloads:
        raise ValueError("both workloads are empty: give a positive single or batch count")
    return workloads


def add_inference_times(summary: dict, records: list[RequestRecord]) -> dict:
    """Add ``inference_s``: client latency minus server-reported queueing, per completed request.

    Left ``None`` (with a note) when the server reported no queueing time.
    """
    inference = [r.latency_s - r.queued_s for r in records if r.completed and r.queued_s is not None]
    summary["inference_s"] = distribution(inference)
    if summary["inference_s"] is None and summary["completed"]:
        summary["notes"].append("inference latency omitted: the server reported no queueing time")
    return summary
