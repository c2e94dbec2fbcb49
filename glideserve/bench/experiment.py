"""Run load schedules against one or more systems and collect records and summaries.

For each system the benchmark either uses a server that is already running (``url``)
or starts ``glideserve serve --system S --model M`` itself, measures the isolated
latency (requests one at a time) to set the SLO, runs every schedule open-loop and
summarises each run. Systems run one after another so they never share the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from glideserve.bench.arrivals import Schedule
from glideserve.bench.loadgen import RequestTemplate, measure_isolated_latency, run_open_loop
from glideserve.bench.metrics import summarize
from glideserve.bench.records import RequestRecord
from glideserve.bench.server_process import ServerProcess


@dataclass(frozen=True)
class Target:
    """A system under test: a running server at ``url``, or one to start from ``model``.

    ``system`` is what ``glideserve serve --system`` starts; ``label`` names the run in
    reports (default: the system), so one system can run twice with different
    ``server_args`` (say ``--policy fcfs`` and ``--policy slack``).
    """

    system: str
    url: str | None = None
    model: str | None = None
    server_args: tuple[str, ...] = ()
    ready_timeout_s: float = 600.0
    label: str = ""

    def __post_init__(self):
        if (self.url is None) == (self.model is None):
            raise ValueError(f"system {self.system!r}: give either a server URL or a model to start the server with")
        if not self.label:
            object.__setattr__(self, "label", self.system)


@dataclass(frozen=True)
class SloPolicy:
    """Per-request SLO: ``slo_ms`` if given, else ``slo_scale`` x a reference isolated latency.

    A system's isolated latency is the median of ``isolated_requests`` requests sent
    one at a time after ``warmup`` discarded ones (0 requests: not measured). Systems
    compared side by side share one SLO: the reference is the first system's isolated
    latency, so a system cannot loosen its own SLO by being slow alone.
    ``slo_ms=None`` and ``slo_scale=None``: no SLO (every image counts as succeeded).
    """

    slo_ms: float | None = None
    slo_scale: float | None = 4.0
    isolated_requests: int = 3
    warmup: int = 1

    def __post_init__(self):
        for name in ("slo_ms", "slo_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.slo_ms is None and self.slo_scale is not None and self.isolated_requests < 1:
            raise ValueError("an SLO relative to the isolated latency needs isolated_requests >= 1")

    def slo_s(self, reference_isolated_s: float | None) -> float | None:
        if self.slo_ms is not None:
            return self.slo_ms / 1000.0
        if self.slo_scale is None:
            return None
        return self.slo_scale * reference_isolated_s

    def slo_by_class(self, reference: dict[str, float | None], labels: list[str]) -> dict[str, float | None]:
        """Each class's SLO from its own reference isolated latency (mixed workloads)."""
        return {label: self.slo_s(reference.get(label)) for label in labels}


@dataclass(frozen=True)
class Workload:
    """One schedule to run, with the offered rate it stands for (reported, and the sweep's x axis)."""

    label: str
    schedule: Schedule
    offered_rate: float | None


@dataclass
class RunResult:
    """Records and summary of one workload on one system."""

    system: str
    workload: str
    records: list[RequestRecord]
    summary: dict = field(default_factory=dict)


@contextlib.contextmanager
def open_target(target: Target, log_dir: Path):
    """Yield ``(url, server)``; ``server`` is the started ServerProcess, or None for a given URL."""
    if target.url is not None:
        yield target.url, None
        return
    server = ServerProcess(target.system, target.model, log_path=log_dir / f"server-{target.label}.log",
                           extra_args=target.server_args, ready_timeout_s=target.ready_timeout_s)
    with server:
        yield server.url, server


def run_system(target: Target, workloads: list[Workload], prompts: list[str], template: RequestTemplate, *,
               slo: SloPolicy, timeout_s: float, log_dir: Path,
               reference_isolated_s: dict[str, float | None] | None = None, flops_per_image: float | None = None,
               peak_flops: float | None = None, cooldown_s: float = 2.0, keep_images: bool = False,
               on_ready=None, log=print) -> list[RunResult]:
    """Run each workload on one system in order; see the module docstring.

    ``reference_isolated_s`` maps each request class (see ``RequestTemplate.classes``)
    to the isolated latency its SLO is relative to; ``None`` uses this system's own
    (the first system of a comparison). ``keep_images`` keeps each returned PNG on its
    record, for scoring after the run. ``on_ready(target, url)``, if given, runs once the
    server answers and before anything is measured (extra probes of the same server).
    """
    results = []
    name = target.label
    classes = template.classes()
    labels = [c.class_label for c in classes]
    with open_target(target, log_dir) as (url, server):
        if on_ready is not None:
            on_ready(target, url)
        isolated: dict[str, float | None] = {label: None for label in labels}
        if slo.isolated_requests:
            for cls in classes:
                isolated[cls.class_label] = asyncio.run(measure_isolated_latency(
                    url, prompts, cls, count=slo.isolated_requests, warmup=slo.warmup, timeout_s=timeout_s))
        slo_s = slo.slo_by_class(reference_isolated_s if reference_isolated_s is not None else isolated, labels)
        for label in labels:
            log(f"[{name}] {label}: isolated latency {_seconds(isolated[label])}, SLO {_seconds(slo_s[label])}")
        for i, workload in enumerate(workloads):
            if i and cooldown_s > 0:
                time.sleep(cooldown_s)  # let requests the client gave up on drain from the server
            offered = "" if workload.offered_rate is None else f", {workload.offered_rate:.2f} req/s offered"
            log(f"[{name}] {workload.label}: {len(workload.schedule)} requests over "
                f"{workload.schedule.span_s:.1f} s{offered}")
            cpu_before = server.cpu_seconds() if server else None
            records = asyncio.run(run_open_loop(url, workload.schedule, prompts, template, slo_s=slo_s,
                                                timeout_s=timeout_s, keep_images=keep_images))
            cpu = server.cpu_seconds() - cpu_before if server else None
            summary = summarize(records, offered_rate=workload.offered_rate, flops_per_image=flops_per_image,
                                peak_flops=peak_flops, cpu_seconds=cpu)
            summary.update(system=name, workload=workload.label,
                           isolated_latency_s=isolated[labels[0]] if len(labels) == 1 else None,
                           isolated_latency_by_class=isolated)
            results.append(RunResult(name, workload.label, records, summary))
    if server is not None:
        # A non-zero code means the server crashed or did not shut down cleanly on SIGTERM.
        log(f"[{name}] server exited with code {server.returncode}")
        for run in results:
            run.summary["server_exit_code"] = server.returncode
    return results


def run_systems(targets: list[Target], workloads: list[Workload], prompts: list[str], template: RequestTemplate,
                **options) -> dict[str, list[RunResult]]:
    """:func:`run_system` for each target in turn, all sharing the first one's SLO reference."""
    results: dict[str, list[RunResult]] = {}
    reference = None
    for target in targets:
        if target.label in results:
            raise ValueError(f"system {target.label!r} is listed twice; give each run its own label (LABEL=SYSTEM)")
        runs = run_system(target, workloads, prompts, template, reference_isolated_s=reference, **options)
        results[target.label] = runs
        if reference is None:
            reference = runs[0].summary["isolated_latency_by_class"]
    return results


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f} s"
