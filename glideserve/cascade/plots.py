"""PNG plots of cascade runs over time (matplotlib's object API: no display or global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _smooth(values, window: int = 5) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.size < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="same")


def plot_timelines(timelines: dict[str, dict[str, list[float]]], path: str | Path, title: str = "",
                   capacity_label: str = "light share of capacity", capacity_total: float = 1.0) -> None:
    """Four panels over time, one line per policy: demand (arrivals/s), the planned escalated share f(t)
    (``escalated_plan``; the raw threshold where a timeline lacks it), the light model's share of capacity,
    and SLO violations per second (late + dropped, 5 s moving average)."""
    fig = Figure(figsize=(8.0, 9.0), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    first = next(iter(timelines.values()), {})
    if "arrivals" in first:
        axes[0].plot(_smooth(first["arrivals"]), color="black", label="arrivals/s (5 s mean)")
    for policy, timeline in timelines.items():
        if "demand" in timeline and policy not in ("all-light", "all-heavy"):
            axes[0].plot(timeline["demand"], linestyle="--", label=f"{policy}: planned demand")
        axes[1].plot(timeline.get("escalated_plan", timeline.get("threshold", [])), label=policy)
        share = np.asarray(timeline.get("light_workers", []), dtype=float) / capacity_total
        axes[2].plot(share, label=policy)
        violations = np.asarray(timeline.get("late", []), dtype=float) + np.asarray(timeline.get("dropped", []),
                                                                                   dtype=float)
        axes[3].plot(_smooth(violations), label=policy)
    second = "planned escalated share" if "escalated_plan" in first else "threshold"
    labels = ["requests / s", second, capacity_label, "violations / s"]
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds since the first arrival")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def with_escalation(timeline: dict[str, list[float]], escalation) -> dict[str, list[float]]:
    """The timeline plus ``escalated_plan``: f(threshold) each second (``escalation`` is f)."""
    return {**timeline, "escalated_plan": [escalation(t) for t in timeline.get("threshold", [])]}


def plot_simulation(results, path: str | Path, title: str = "", escalation=None) -> None:
    """The simulator's per-policy timelines (see :func:`plot_timelines`); with ``escalation`` (f), the
    planned escalated share instead of the raw threshold."""
    workers = results[0].workers if results else 1
    timelines = {r.policy: r.timeline if escalation is None else with_escalation(r.timeline, escalation)
                 for r in results}
    plot_timelines(timelines, path, title, "light share of workers", workers)
