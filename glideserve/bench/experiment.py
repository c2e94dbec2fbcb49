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
    """A system under test: a running server at ``url``, or one to start from ``model``."""

    system: str
    url: str | None = None
    model: str | None = None
    server_args: tuple[str, ...] = ()
    ready_timeout_s: float = 600.0

    def __post_init__(self):
        if (self.url is None) == (self.model is None):
            raise ValueError(f"system {self.system!r}: give either a server URL or a model to start the server with")


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
    server = ServerProcess(target.system, target.model, log_path=log_dir / f"server-{target.system}.log",
                           extra_args=target.server_args, ready_timeout_s=target.ready_timeout_s)
    with server:
        yield server.url, server


def run_system(target: Target, workloads: list[Workload], prompts: list[str], template: RequestTemplate, *,
               slo: SloPolicy, timeout_s: float, log_dir: Path, reference_isolated_s: float | None = None,
               flops_per_image: float | None = None, peak_flops: float | None = None, cooldown_s: float = 2.0,
               log=print) -> list[RunResult]:
    """Run each workload on one system in order; see the module docstring.

    ``reference_isolated_s`` is the isolated latency the SLO is relative to; ``None``
    uses this system's own (the first system of a comparison).
    """
    results = []
    with open_target(target, log_dir) as (url, server):
        isolated_s = None
        if slo.isolated_requests:
            isolated_s = asyncio.run(measure_isolated_latency(url, prompts, template, count=slo.isolated_requests,
                                                              warmup=slo.warmup, timeout_s=timeout_s))
        slo_s = slo.slo_s(reference_isolated_s if reference_isolated_s is not None else isolated_s)
        log(f"[{target.system}] isolated latency: {_seconds(isolated_s)}, SLO: {_seconds(slo_s)}")
        for i, workload in enumerate(workloads):
            if i and cooldown_s > 0:
                time.sleep(cooldown_s)  # let requests the client gave up on drain from the server
            offered = "" if workload.offered_rate is None else f", {workload.offered_rate:.2f} req/s offered"
            log(f"[{target.system}] {workload.label}: {len(workload.schedule)} requests over "
                f"{workload.schedule.span_s:.1f} s{offered}")
            cpu_before = server.cpu_seconds() if server else None
            records = asyncio.run(run_open_loop(url, workload.schedule, prompts, template, slo_s=slo_s,
                                                timeout_s=timeout_s))
            cpu = server.cpu_seconds() - cpu_before if server else None
            summary = summarize(records, offered_rate=workload.offered_rate, flops_per_image=flops_per_image,
                                peak_flops=peak_flops, cpu_seconds=cpu)
            summary.update(system=target.system, workload=workload.label, isolated_latency_s=isolated_s)
            results.append(RunResult(target.system, workload.label, records, summary))
    if server is not None:
        # A non-zero code means the server crashed or did not shut down cleanly on SIGTERM.
        log(f"[{target.system}] server exited with code {server.returncode}")
        for run in results:
            run.summary["server_exit_code"] = server.returncode
    return results


def run_systems(targets: list[Target], workloads: list[Workload], prompts: list[str], template: RequestTemplate,
                **options) -> dict[str, list[RunResult]]:
    """:func:`run_system` for each target in turn, all sharing the first one's SLO reference."""
    results: dict[str, list[RunResult]] = {}
    reference = None
    for target in targets:
        if target.system in results:
            raise ValueError(f"system {target.system!r} is listed twice; give each run its own label")
        runs = run_system(target, workloads, prompts, template, reference_isolated_s=reference, **options)
        results[target.system] = runs
        if reference is None:
            reference = runs[0].summary["isolated_latency_s"]
    return results


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f} s"
