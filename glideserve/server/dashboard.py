"""The live dashboard: a bounded history of samples of the same Prometheus registry ``/metrics`` renders.

Once a second the server reads every metric family of its registry and turns the counters into rates
over the last second (offered, admitted, refused, dropped requests; full and cached steps; step time
per model; cascade escalations), the gauges into values (queue depth, running requests, batch rows,
resident models, the cascade's threshold, fine-tuning progress) and the request-latency histogram into
percentiles over the last 10 s. The last ``HISTORY_S`` seconds are kept (a ring buffer); the page polls
``GET /v1/dashboard?since=T``. A panel exists only when the server exports its metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry

HISTORY_S = 600
SAMPLE_INTERVAL_S = 1.0
LATENCY_WINDOW_S = 10
REFUSED_CODES = ("slo_unattainable", "queue_full", "shutting_down", "too_many_connections")
DROPPED_CODES = ("deadline_exceeded", "drain_timeout")


def read_registry(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of the registry: ``(name, sorted labels) -> value``, as /metrics would render it."""
    values = {}
    for family in registry.collect():
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _sum(values: dict, name: str, **match) -> float | None:
    found = [v for (n, labels), v in values.items() if n == name
             and all(dict(labels).get(k) == want for k, want in match.items())]
    return sum(found) if found else None


def _by(values: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in values.items() if n == name and label in dict(labels)}


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative ``(upper bound, count)`` pairs, linear within a bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, previous_bound, previous_count = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / (count - previous_count) if count > previous_count else 1.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


class DashboardHistory:
    """Samples of the registry (see the module docstring); ``sample()`` is called once a second."""

    def __init__(self, registry: CollectorRegistry, slo_ms: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.time, history_s: int = HISTORY_S):
        self.registry = registry
        self.slo_ms = slo_ms
        self.clock = clock
        self.samples: deque[dict] = deque(maxlen=int(history_s / SAMPLE_INTERVAL_S))
        self._previous: tuple[float, dict] | None = None
        self._latency: deque[tuple[float, list[tuple[float, float]]]] = deque(maxlen=LATENCY_WINDOW_S + 1)

    def sample(self) -> dict:
        now, values = self.clock(), read_registry(self.registry)
        previous = self._previous
        self._previous = (now, values)
        elapsed = max(1e-6, now - previous[0]) if previous else None

        def rate(name: str, **match) -> float | None:
            current = _sum(values, name, **match)
            if current is None or previous is None:
                return None if current is None else 0.0
            return max(0.0, current - (_sum(previous[1], name, **match) or 0.0)) / elapsed

        statuses = _by(values, "glideserve_requests_total", "status")
        per_status = {s: rate("glideserve_requests_total", status=s) or 0.0 for s in statuses}
        offered = sum(per_status.values())
        refused = sum(v for s, v in per_status.items() if s in REFUSED_CODES)
        point = {"t": round(now, 3), "offered_per_s": offered, "admitted_per_s": offered - refused,
                 "refused_per_s": refused,
                 "dropped_per_s": sum(v for s, v in per_status.items() if s in DROPPED_CODES),
                 "completed_per_s": per_status.get("completed", 0.0),
                 "requests_total": {s: v for s, v in statuses.items()},
                 "queue_depth": _sum(values, "glideserve_queue_depth"),
                 "running": _sum(values, "glideserve_running_requests"),
                 "batch_rows": _sum(values, "glideserve_batch_size_rows"),
                 "batch_requests": _sum(values, "glideserve_batch_size_requests"),
                 "full_steps_per_s": rate("glideserve_denoising_steps_total", kind="full"),
                 "cached_steps_per_s": rate("glideserve_denoising_steps_total", kind="cached"),
                 "step_share": {m: rate("glideserve_model_step_seconds_total", model=m)
                                for m in _by(values, "glideserve_model_step_seconds_total", "model")},
                 "slo_ms": self.slo_ms(),
                 **self._latency_percentiles(now, values)}
        loaded = _by(values, "glideserve_model_loaded", "model")
        if loaded:
            point["models_loaded"] = loaded
        if _sum(values, "glideserve_cascade_threshold") is not None:
            point["cascade"] = {"threshold": _sum(values, "glideserve_cascade_threshold"),
                                "escalations_per_s": rate("glideserve_cascade_escalations_total"),
                                "served_by": _by(values, "glideserve_cascade_requests_total", "served_by")}
        if _sum(values, "glideserve_loras_resident") is not None:
            point["loras_resident"] = _by(values, "glideserve_loras_resident", "model")
        if _sum(values, "glideserve_finetune_jobs") is not None:
            point["finetune"] = {"jobs": _by(values, "glideserve_finetune_jobs", "status"),
                                 "steps_per_s": rate("glideserve_finetune_steps_total"),
                                 "steps_total": _sum(values, "glideserve_finetune_steps_total")}
        self.samples.append(point)
        return point

    def _latency_percentiles(self, now: float, values: dict) -> dict:
        buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in values.items()
                         if n == "glideserve_request_latency_seconds_bucket")
        self._latency.append((now, buckets))
        oldest = self._latency[0][1]
        window = [(bound, count - dict(oldest).get(bound, 0.0)) for bound, count in buckets]
        return {f"latency_p{q}_s": _quantile(window, q / 100) for q in (50, 95, 99)}

    def since(self, t: float) -> list[dict]:
        return [s for s in self.samples if s["t"] > t]

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)
