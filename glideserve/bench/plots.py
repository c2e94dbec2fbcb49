"""PNG plots of benchmark results (matplotlib's object API: no display or global state needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from glideserve.bench.records import DROPPED, LATE, ON_TIME, REFUSED, STATUSES, RequestRecord

OUTCOME_COLORS = {ON_TIME: "#2ca02c", LATE: "#ff7f0e", REFUSED: "#9467bd", DROPPED: "#d62728"}


def plot_latency_cdf(records_by_system: dict[str, list[RequestRecord]], path: str | Path) -> None:
    """Empirical CDF of client latency per system (completed requests only); SLO as a dashed line."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for system, records in records_by_system.items():
        latencies = np.sort([r.latency_s for r in records if r.latency_s is not None])
        if latencies.size == 0:
            continue
        line, = ax.step(latencies, np.arange(1, latencies.size + 1) / latencies.size, where="post", label=system)
        slos = [r.slo_s for r in records if r.slo_s is not None]
        if slos:
            ax.axvline(float(np.median(slos)), color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("latency (s); dashed: SLO")
    ax.set_ylabel("fraction of completed requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path, dpi=120)


def plot_outcomes_over_time(per_second_by_system: dict[str, list[dict]], path: str | Path) -> None:
    """Per-second on-time / late / refused / dropped counts, stacked, one panel per system."""
    systems = list(per_second_by_system)
    fig = Figure(figsize=(8.0, 2.4 * max(1, len(systems))), layout="constrained")
    axes = fig.subplots(max(1, len(systems)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, system in zip(axes, systems):
        rows = per_second_by_system[system]
        seconds = np.array([r["second"] for r in rows])
        bottom = np.zeros(len(rows))
        for status in STATUSES:
            counts = np.array([r[status] for r in rows], dtype=float)
            ax.bar(seconds, counts, width=1.0, bottom=bottom, align="edge", color=OUTCOME_COLORS[status],
                   label=status.replace("_", "-"))
            bottom += counts
        ax.set_title(system, fontsize=10)
        ax.set_ylabel("requests / s")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("arrival second")
    fig.savefig(path, dpi=120)


def plot_sweep(sweeps: dict[str, list[dict]], path: str | Path) -> None:
    """Throughput (solid) and goodput (dashed), images/min, against offered rate, per system."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for system, runs in sweeps.items():
        runs = sorted(runs, key=lambda s: s["offered_rate"])
        rates = [s["offered_rate"] for s in runs]
        line, = ax.plot(rates, [s["throughput_img_per_min"] or 0.0 for s in runs], marker="o",
                        label=f"{system} throughput")
        ax.plot(rates, [s["goodput_img_per_min"] or 0.0 for s in runs], marker="s", linestyle="--",
                color=line.get_color(), label=f"{system} goodput")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("images / min")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
