"""Write benchmark results: JSON summaries and Markdown tables of systems side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

MISSING = "n/a"


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def fmt(value, digits: int = 2, scale: float = 1.0, percent: bool = False) -> str:
    """A table cell: ``n/a`` for missing values, else the number rounded to ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if percent:
        return f"{100.0 * value:.{digits}f}%"
    return f"{value * scale:.{digits}f}"


def _stat(summary: dict, key: str, stat: str):
    block = summary.get(key)
    return None if block is None else block.get(stat)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


LOAD_COLUMNS = ["system", "requests", "on time / late / refused / dropped", "SLO attainment", "goodput (img/min)",
                "late % of served", "throughput (img/min)", "served p50 (s)", "served p99 (s)", "max (s)",
                "refusal wait p50 / p99 (ms)", "queue p50 (s)", "CPU s/img", "MFU"]
CLASS_COLUMNS = ["system", "class", "requests", "SLO (s)", "on time / late / refused / dropped", "SLO attainment",
                 "late % of served", "served p50 (s)", "served p99 (s)"]


def _outcomes(summary: dict) -> str:
    return f"{summary['on_time']} / {summary['late']} / {summary['refused']} / {summary['dropped']}"


def load_row(label: str, summary: dict) -> list[str]:
    return [
        label, str(summary["requests"]), _outcomes(summary),
        fmt(summary["slo_attainment"], 1, percent=True),
        fmt(summary["goodput_img_per_min"], 1), fmt(summary.get("late_share_of_served"), 1, percent=True),
        fmt(summary["throughput_img_per_min"], 1),
        fmt(_stat(summary, "latency_s", "p50")), fmt(_stat(summary, "latency_s", "p99")),
        fmt(_stat(summary, "latency_s", "max")),
        f"{fmt(_stat(summary, 'refusal_wait_s', 'p50'), 1, 1000)} / {fmt(_stat(summary, 'refusal_wait_s', 'p99'), 1, 1000)}",
        fmt(_stat(summary, "queue_s", "p50")), fmt(summary.get("cpu_s_per_image")),
        fmt(summary.get("mfu"), 2, percent=True),
    ]


def class_rows(label: str, summary: dict) -> list[list[str]]:
    """One row per request class of a mixed workload (none for a single-class one)."""
    return [[label, name, str(c["requests"]), fmt(_stat(c, "slo_s", "p50")), _outcomes(c),
             fmt(c["slo_attainment"], 1, percent=True), fmt(c.get("late_share_of_served"), 1, percent=True),
             fmt(_stat(c, "latency_s", "p50")), fmt(_stat(c, "latency_s", "p99"))]
            for name, c in summary.get("by_class", {}).items()]


QUALITY_COLUMNS = ["system", "images scored", "correct and on time", "correct goodput (img/min)",
                   "judge accuracy of served", "mean SSIM vs exact", "min SSIM", "cached steps"]


def quality_row(label: str, q: dict) -> list[str]:
    return [label, str(q["scored_images"]), str(q["correct_on_time"]), fmt(q["correct_goodput_img_per_min"], 1),
            fmt(q["judge_accuracy_served"], 3), fmt(q["mean_ssim_vs_exact"], 3), fmt(q["min_ssim_vs_exact"], 3),
            fmt(q["cached_step_share"], 1, percent=True)]


def load_markdown(summaries: dict[str, dict], title: str = "") -> str:
    """Systems side by side for one load, then the served images' quality (when scored) and the
    per-class rows of a mixed workload; notes follow."""
    rows = [load_row(system, summary) for system, summary in summaries.items()]
    text = (f"## {title}\n\n" if title else "") + markdown_table(LOAD_COLUMNS, rows)
    scored = [quality_row(system, s["quality"]) for system, s in summaries.items() if s.get("quality")]
    if scored:
        text += ("\nServed images against the exact engine (judge: the toy task's; correct goodput counts "
                 "on-time images the judge reads right):\n\n")
        text += markdown_table(QUALITY_COLUMNS, scored)
    per_class = [row for system, summary in summaries.items() for row in class_rows(system, summary)]
    if per_class:
        text += "\nBy request class (each class's SLO scales its own isolated latency):\n\n"
        text += markdown_table(CLASS_COLUMNS, per_class)
    notes = sorted({f"{system}: {note}" for system, s in summaries.items() for note in s.get("notes", [])})
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    return text


def sweep_markdown(sweeps: dict[str, list[dict]]) -> str:
    """One row per (system, offered rate) of a sweep."""
    header = ["offered rate (req/s)"] + LOAD_COLUMNS
    rows = [[fmt(s["offered_rate"], 2)] + load_row(system, s) for system, runs in sweeps.items() for s in runs]
    return markdown_table(header, rows)


LATENCY_COLUMNS = ["system", "workload", "requests", "total mean (s)", "total p50 (s)", "total p95 (s)",
                   "total max (s)", "queue mean (s)", "queue p95 (s)", "inference mean (s)", "inference p95 (s)",
                   "throughput (img/min)"]


def latency_markdown(results: dict[str, dict[str, dict]]) -> str:
    """``results[system][workload]`` holds a summary from :func:`glideserve.bench.latency.latency_summary`."""
    rows = []
    for system, workloads in results.items():
        for workload, s in workloads.items():
            rows.append([
                system, workload, str(s["requests"]),
                fmt(_stat(s, "latency_s", "mean")), fmt(_stat(s, "latency_s", "p50")),
                fmt(_stat(s, "latency_s", "p95")), fmt(_stat(s, "latency_s", "max")),
                fmt(_stat(s, "queue_s", "mean")), fmt(_stat(s, "queue_s", "p95")),
                fmt(_stat(s, "inference_s", "mean")), fmt(_stat(s, "inference_s", "p95")),
                fmt(s["throughput_img_per_min"], 1),
            ])
    return markdown_table(LATENCY_COLUMNS, rows)
