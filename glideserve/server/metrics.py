"""Prometheus metrics of one server instance, kept in the app's own registry.

A registry per app (never the process-global one) lets several servers, or tests,
live in one process without their counters colliding.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glideserve.outputs import RequestTimings

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
THROUGHPUT_WINDOW_S = 60.0


class ServerMetrics:
    """Counters, gauges and histograms of the serving path.

    ``stats`` is the backend's ``stats()``; the queue-depth and running gauges read it
    at scrape time so they are never stale. ``on_step`` is a backend step listener
    (it runs on the engine thread; prometheus-client metrics are thread-safe). The
    rest is recorded by the HTTP layer, per API request or per image.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], object], clock: Callable[[], float] = time.monotonic,
                 model_cards: Callable[[], list[dict]] | None = None,
                 cascade: Callable[[], dict] | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._clock = clock
        self._image_times: deque[float] = deque()
        r = self.registry
        self.requests = Counter("glideserve_requests", "Image generation API requests by final status",
                                ["status"], registry=r)
        self.queue_depth = Gauge("glideserve_queue_depth", "Engine requests waiting for a batch slot", registry=r)
        self.queue_depth.set_function(lambda: stats().num_waiting)
        self.running = Gauge("glideserve_running_requests", "Engine requests holding a batch slot", registry=r)
        self.running.set_function(lambda: stats().num_running)
        self.batch_requests = Gauge("glideserve_batch_size_requests", "Requests in the last denoising step",
                                    registry=r)
        self.batch_rows = Gauge("glideserve_batch_size_rows", "Model rows in the last denoising step", registry=r)
        self.step_latency = Histogram("glideserve_step_latency_seconds", "Wall time of one engine step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.request_latency = Histogram("glideserve_request_latency_seconds",
                                         "Arrival to last image of a completed API request",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("glideserve_queue_latency_seconds",
                                       "Per image: arrival to its first denoising step",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("glideserve_images_generated", "Images generated", registry=r)
        self.denoising_steps = Counter("glideserve_denoising_steps", "Denoising steps of generated images, by "
                                       "kind: full (every block) or cached (reused features)", ["kind"], registry=r)
        self.slo = Counter("glideserve_slo", "Completed requests that carried slo_ms, by outcome",
                           ["result"], registry=r)
        for result in ("met", "missed"):
            self.slo.labels(result=result)
        self.model_step_seconds = Counter("glideserve_model_step_seconds", "Engine step time spent on each model "
                                          "(how steps are shared between models)", ["model"], registry=r)
        r.register(SchedulerCollector(stats))
        if model_cards is not None:
            r.register(ModelCollector(model_cards))
        if cascade is not None:
            r.register(CascadeCollector(cascade))

    def on_step(self, step) -> None:
        """Backend step listener: ``step`` has ``duration_s``, ``num_requests``, ``num_rows``."""
        self.step_latency.observe(step.duration_s)
        self.model_step_seconds.labels(model=getattr(step, "model", "") or "default").inc(step.duration_s)
        self.batch_requests.set(step.num_requests)
        self.batch_rows.set(step.num_rows)

    def count_request(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def observe_image(self, timings: RequestTimings) -> None:
        self.images.inc()
        self.denoising_steps.labels(kind="full").inc(timings.full_steps)
        self.denoising_steps.labels(kind="cached").inc(timings.cached_steps)
        self.queue_latency.observe(timings.queued_s)
        now = self._clock()
        self._image_times.append(now)
        self._trim(now)

    def observe_completed(self, total_s: float, slo_ms: float | None) -> bool | None:
        """Record a completed request; returns whether it met its SLO (None without one)."""
        self.count_request("completed")
        self.request_latency.observe(total_s)
        if slo_ms is None:
            return None
        met = total_s * 1000.0 <= slo_ms
        self.slo.labels(result="met" if met else "missed").inc()
        return met

    def images_per_minute(self) -> float:
        now = self._clock()
        self._trim(now)
        return len(self._image_times) * 60.0 / THROUGHPUT_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._image_times and now - self._image_times[0] > THROUGHPUT_WINDOW_S:
            self._image_times.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SchedulerCollector:
    """The scheduler's own totals, read from the backend's ``stats()`` at scrape time.

    ``glideserve_scheduler_decisions_total{decision}`` counts refusals at admission
    (``refused``: could not meet the deadline), drops of admitted requests that fell
    too far behind (``dropped``), and preemptions and resumes at step boundaries;
    ``glideserve_paused_requests`` is how many requests are paused right now. The
    HTTP answers those decisions produced are in ``glideserve_requests_total`` by code.
    """

    DECISIONS = ("refused", "dropped", "preempted", "resumed")

    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def describe(self):
        return []  # values come from the backend at scrape time; nothing to check at registration

    def collect(self):
        stats = self._stats()
        decisions = CounterMetricFamily("glideserve_scheduler_decisions", "Scheduler decisions since start",
                                        labels=["decision"])
        for decision in self.DECISIONS:
            decisions.add_metric([decision], getattr(stats, f"{decision}_total", 0))
        yield decisions
        yield GaugeMetricFamily("glideserve_paused_requests", "Requests paused by preemption, holding their latents",
                                value=getattr(stats, "num_paused", 0))


class ModelCollector:
    """Per model, read at scrape time: ``glideserve_model_loaded{model}`` (1 while its weights are
    resident), ``glideserve_model_loads_total`` and ``glideserve_model_unloads_total`` (loads and
    unloads under the weights budget, start-up included), ``glideserve_model_weights_bytes``,
    ``glideserve_model_offloaded`` (1 while parked in host memory) and, for a model served with
    ``--compile``, ``glideserve_compiled_graphs``, ``glideserve_compile_seconds`` and
    ``glideserve_compiled_eager_calls_total`` (block calls at shapes not compiled)."""

    def __init__(self, model_cards: Callable[[], list[dict]]):
        self._cards = model_cards

    def describe(self):
        return []

    def collect(self):
        loaded = GaugeMetricFamily("glideserve_model_loaded", "1 while the model's weights are resident",
                                   labels=["model"])
        weights = GaugeMetricFamily("glideserve_model_weights_bytes", "Bytes of the model's weights",
                                    labels=["model"])
        loads = CounterMetricFamily("glideserve_model_loads", "Loads of the model's weights", labels=["model"])
        unloads = CounterMetricFamily("glideserve_model_unloads", "Unloads of the model's weights to stay "
                                      "within the weights budget", labels=["model"])
        offloaded = GaugeMetricFamily("glideserve_model_offloaded", "1 while the unloaded model is kept in host "
                                      "memory (--offload-memory-gb)", labels=["model"])
        graphs = GaugeMetricFamily("glideserve_compiled_graphs", "Graphs compiled at start-up (--compile)",
                                   labels=["model"])
        compile_s = GaugeMetricFamily("glideserve_compile_seconds", "Seconds the start-up compile took",
                                      labels=["model"])
        eager = CounterMetricFamily("glideserve_compiled_eager_calls", "Block calls that ran eager at a shape "
                                    "not compiled at start-up", labels=["model"])
        for card in self._cards():
            name = card["name"]
            loaded.add_metric([name], 1.0 if card.get("loaded", True) else 0.0)
            weights.add_metric([name], card.get("weights_bytes") or 0)
            loads.add_metric([name], card.get("loads", 1))
            unloads.add_metric([name], card.get("unloads", 0))
            offloaded.add_metric([name], 1.0 if card.get("offloaded") else 0.0)
            compiled = card.get("compiled")
            if compiled:
                graphs.add_metric([name], compiled["graphs"])
                compile_s.add_metric([name], compiled["compile_s"])
                eager.add_metric([name], compiled["eager_calls"])
        yield from (loaded, weights, loads, unloads, offloaded, graphs, compile_s, eager)


class CascadeCollector:
    """A cascade's state at scrape time (``CascadeBackend.describe``): answers by the model that served
    them, escalations, escalations the heavy model refused (answered by the light image), the threshold in
    force and, with ``threshold=auto``, the planned demand and each model's share of step time."""

    def __init__(self, describe: Callable[[], dict]):
        self._describe = describe

    def describe(self):
        return []

    def collect(self):
        state = self._describe()
        counts = state["counts"]
        served = CounterMetricFamily("glideserve_cascade_requests", "Cascade answers by the model that served them",
                                     labels=["served_by"])
        served.add_metric([state["light"]], counts["light"])
        served.add_metric([state["heavy"]], counts["heavy"])
        yield served
        yield CounterMetricFamily("glideserve_cascade_escalations", "Cascade requests sent on to the heavy model",
                                  value=counts["escalated"])
        yield CounterMetricFamily("glideserve_cascade_heavy_refused", "Escalations the heavy model could not take "
                                  "in time (answered with the light image)", value=counts["heavy_refused"])
        yield GaugeMetricFamily("glideserve_cascade_threshold", "Discriminator confidence below which a request "
                                "escalates", value=state["threshold"])
        plan = state.get("plan")
        if plan is not None:
            yield GaugeMetricFamily("glideserve_cascade_planned_demand", "Demand (requests/s, with headroom) the "
                                    "allocator planned for", value=plan["demand"])
            shares = GaugeMetricFamily("glideserve_cascade_share", "Share of step time the allocator gives each "
                                       "model", labels=["model"])
            shares.add_metric([state["light"]], plan["light_capacity"])
            shares.add_metric([state["heavy"]], plan["heavy_capacity"])
            yield shares


class LoraCollector:
    """``glideserve_loras_resident{model}``: adapters whose weights are in memory, per model that serves LoRAs."""

    def __init__(self, model_cards: Callable[[], list[dict]], loras: Callable[[str], list[dict]]):
        self._cards, self._loras = model_cards, loras

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily("glideserve_loras_resident", "LoRA adapters resident in memory, by model",
                                   labels=["model"])
        for card in self._cards():
            if not card.get("loaded", True):
                continue
            try:
                adapters = self._loras(card["name"])
            except Exception:  # a model without a LoRA folder, or one just unloaded: nothing to report
                continue
            if adapters:
                family.add_metric([card["name"]], sum(bool(a.get("resident")) for a in adapters))
        yield family


class FineTuningCollector:
    """Fine-tuning jobs by status, optimizer steps of every job, and the running job's last loss."""

    def __init__(self, service):
        self._service = service

    def describe(self):
        return []

    def collect(self):
        jobs = list(self._service.jobs.values())
        by_status = GaugeMetricFamily("glideserve_finetune_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in ("queued", "running", "paused", "succeeded", "failed", "cancelled"):
            by_status.add_metric([status], sum(j.status == status for j in jobs))
        yield by_status
        yield CounterMetricFamily("glideserve_finetune_steps", "Optimizer steps of fine-tuning jobs",
                                  value=sum(j.step for j in jobs))
        running = [j for j in jobs if j.status in ("running", "paused") and j.loss is not None]
        yield GaugeMetricFamily("glideserve_finetune_loss", "Last training loss of the running job",
                                value=running[0].loss if running else 0.0)
