"""The cascade benchmark: all-light, all-heavy, a static cascade and the MILP cascade under one trace.

One run measures, in this order: the heavy model's isolated latency (the SLO is a multiple of
it) and its capacity (a burst, served alone); then a trace of the MAF shape fitted to
``overload`` x that capacity, sent open-loop to a fresh server per policy. Every answered image
is read by the scene judge (all-correct, per difficulty level), the toy CLIP and toy FID, so
goodput counts only images that are on time *and* correct.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glideserve.bench.arrivals import Schedule, make_schedule
from glideserve.bench.loadgen import RequestTemplate, measure_isolated_latency, new_client, run_open_loop, send_one
from glideserve.bench.records import DROPPED, ON_TIME, RequestRecord
from glideserve.bench.server_process import ServerProcess
from glideserve.cascade import POLICIES



@dataclass(frozen=True)
class CascadeBench:
    """What one cascade benchmark compares and under which load."""

    light: str
    heavy: str
    discriminator: str | None = None  # None: the light model's bundled one
    static_threshold: float = 0.5
    trace: str = ""
    overload: float = 2.0  # offered load / the heavy model's capacity
    slo_scale: float = 5.0  # SLO / the heavy model's isolated latency
    duration_s: float = 120.0
    per_level: int = 40  # captions of each difficulty the requests draw from
    policies: tuple[str, ...] = POLICIES
    interval_s: float = 5.0
    seed: int = 0
    ready_timeout_s: float = 900.0

    def __post_init__(self):
        unknown = set(self.policies) - set(POLICIES)
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
        if not self.overload > 0 or not self.slo_scale > 0 or not self.duration_s > 0:
            raise ValueError("overload, slo_scale and duration_s must be positive")

    def cascade_arg(self, threshold: str) -> str:
        parts = [f"light={self.light}", f"heavy={self.heavy}", f"threshold={threshold}",
                 f"interval={self.interval_s:g}"]
        if self.discriminator:
            parts.append(f"discriminator={self.discriminator}")
        return ",".join(parts)

    def server(self, policy: str, slo_ms: float) -> tuple[str, tuple[str, ...]]:
        """The model and extra ``serve`` arguments of one policy's server."""
        common = ("--default-slo-ms", f"{slo_ms:.0f}", "--max-queue", "1024", "--no-warmup")
        if policy == "all-light":
            return self.light, common
        if policy == "all-heavy":
            return self.heavy, common
        threshold = "auto" if policy == "milp" else f"{self.static_threshold:g}"
        return self.heavy, common + ("--cascade", self.cascade_arg(threshold))


def scene_prompts(per_level: int, seed: int) -> list[str]:
    """Captions of every difficulty, interleaved (easy, medium, hard, easy, ...): a trace's prompt ids
    spread evenly over the levels."""
    from glideserve.toy import scenes

    by_level = scenes.evaluation_captions(per_level, seed)
    rng = np.random.default_rng(seed)
    for captions in by_level.values():
        rng.shuffle(captions)
    return [c for group in zip(*by_level.values()) for c in group]


async def _poll_metrics(url: str, samples: list[dict], t0: float, stop: asyncio.Event) -> None:
    """Every second: the cascade's threshold, shares and planned demand from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with new_client(10.0) as client:
        while not stop.is_set():
            row = {"t": time.monotonic() - t0}
            try:
                text = (await client.get(url + "/metrics")).text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "glideserve_cascade_threshold":
                            row["threshold"] = sample.value
                        elif sample.name == "glideserve_cascade_planned_demand":
                            row["demand"] = sample.value
                        elif sample.name == "glideserve_cascade_share":
                            row[f"share:{sample.labels['model']}"] = sample.value
            except Exception:  # noqa: BLE001 - a missed sample is a gap in a plot, not a failed run
                pass
            samples.append(row)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def _run_policy(url: str, schedule: Schedule, prompts: list[str], slo_s: float, timeout_s: float
                      ) -> tuple[list[RequestRecord], list[dict]]:
    samples: list[dict] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_metrics(url, samples, time.monotonic(), stop))
    try:
        records = await run_open_loop(url, schedule, prompts, RequestTemplate(), slo_s=slo_s, timeout_s=timeout_s,
                                      keep_images=True)
    finally:
        stop.set()
        await poller
    return records, samples


async def _burst_capacity(url: str, prompts: list[str], count: int, timeout_s: float) -> float:
    """Images per second when ``count`` requests arrive at once (the server's batched throughput)."""
    async with new_client(timeout_s) as client:
        records = [RequestRecord(index=i, prompt_id=i, scheduled_s=0.0, status=DROPPED) for i in range(count)]
        start = time.monotonic()
        await asyncio.gather(*(send_one(client, url, RequestTemplate().body(prompts[i % len(prompts)], i, None),
                                        r, start, timeout_s) for i, r in enumerate(records)))
        wall = time.monotonic() - start
    done = sum(r.completed for r in records)
    if done == 0:
        raise RuntimeError(f"no burst request to {url} completed: {records[0].error}")
    return done / wall


def score_policy(records: list[RequestRecord], duration_s: float, toy_clip) -> dict:
    """Per level and overall: requests, on-time share, judge all-correct of served images, correct and on
    time, toy CLIP/FID, escalation and heavy shares; goodput = correct-and-on-time images per second."""
    from PIL import Image

    from glideserve.toy import scene_judge, scenes
    from glideserve.toy.evaluate import score_scene_images

    levels = {"overall": list(records)}
    for r in records:
        levels.setdefault(scenes.parse_caption(r.prompt).difficulty, []).append(r)
    images = {r.index: np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in records if r.image}
    for r in records:
        if r.index in images:
            r.judge_correct = bool(scene_judge.score(images[r.index], r.prompt)["all"])
    out = {}
    for level, rows in levels.items():
        served = [r for r in rows if r.index in images]
        good = [r for r in rows if r.status == ON_TIME and r.judge_correct]
        escalated = [r for r in served if r.escalated is not None]
        out[level] = {
            "requests": len(rows), "on_time": round(sum(r.status == ON_TIME for r in rows) / max(1, len(rows)), 4),
            "violation_ratio": round(1 - sum(r.status == ON_TIME for r in rows) / max(1, len(rows)), 4),
            "served": len(served),
            "judge_all_correct": round(sum(bool(r.judge_correct) for r in served) / max(1, len(served)), 4),
            "correct_on_time": round(len(good) / max(1, len(rows)), 4),
            "goodput_per_s": round(len(good) / duration_s, 4),
            "escalated": round(sum(bool(r.escalated) for r in escalated) / len(escalated), 4) if escalated else None,
        }
        if toy_clip is not None and len(served) >= 2:
            quality = score_scene_images([images[r.index] for r in served], [r.prompt for r in served], toy_clip)
            out[level]["toy_clip_score"] = round(quality["overall"]["toy_clip_score"], 4)
            out[level]["toy_fid"] = round(quality["overall"]["toy_fid"], 3)
    served_by: dict[str, int] = {}
    for r in records:
        if r.served_by:
            served_by[r.served_by] = served_by.get(r.served_by, 0) + 1
    out["overall"]["served_by"] = served_by
    return out


def per_second(records: list[RequestRecord], seconds: int) -> dict[str, list[float]]:
    """Arrivals, on-time-and-correct images and violations, by the second each request was scheduled."""
    timeline = {k: [0.0] * seconds for k in ("arrivals", "goodput", "late", "dropped")}
    for r in records:
        s = min(seconds - 1, int(r.scheduled_s))
        timeline["arrivals"][s] += 1
        if r.status == ON_TIME:
            timeline["goodput"][s] += bool(r.judge_correct)
        elif r.status == "late":
            timeline["late"][s] += 1
        else:
            timeline["dropped"][s] += 1
    return timeline


@dataclass
class CascadeBenchResult:
    """Everything one run measured (``as_dict`` is what results.json holds)."""

    config: CascadeBench
    slo_s: float
    isolated_s: float
    capacity_per_s: float
    offered_per_s: float
    requests: int
    policies: dict[str, dict] = field(default_factory=dict)  # policy -> {"levels", "timeline", "samples"}

    def as_dict(self) -> dict:
        return {"light": self.config.light, "heavy": self.config.heavy, "slo_s": round(self.slo_s, 3),
                "heavy_isolated_s": round(self.isolated_s, 3), "heavy_capacity_per_s": round(self.capacity_per_s, 3),
                "offered_per_s": round(self.offered_per_s, 3), "requests": self.requests,
                "duration_s": self.config.duration_s, "static_threshold": self.config.static_threshold,
                "trace": Path(self.config.trace).name, "policies": self.policies}


def run_cascade_bench(bench: CascadeBench, out: Path, log=print, toy_clip=None, timeout_s: float = 600.0
                      ) -> CascadeBenchResult:
    """Measure the heavy model alone, build the workload, run every policy on it, and score the images."""
    prompts = scene_prompts(bench.per_level, bench.seed)
    out.mkdir(parents=True, exist_ok=True)
    with ServerProcess("glideserve", bench.heavy, log_path=out / "heavy-alone.log",
                       ready_timeout_s=bench.ready_timeout_s) as heavy:
        isolated = asyncio.run(measure_isolated_latency(heavy.url, prompts, RequestTemplate(), count=5))
        capacity = asyncio.run(_burst_capacity(heavy.url, prompts, 16, timeout_s))
    slo_s = bench.slo_scale * isolated
    offered = bench.overload * capacity
    schedule = make_schedule("trace", rate=offered, duration_s=bench.duration_s, trace=bench.trace, seed=bench.seed)
    log(f"{bench.heavy} alone: isolated {isolated:.2f} s, capacity {capacity:.2f} images/s -> SLO {slo_s:.2f} s, "
        f"offered {offered:.2f}/s ({len(schedule)} requests over {bench.duration_s:g} s)")
    result = CascadeBenchResult(bench, slo_s, isolated, capacity, offered, len(schedule))
    seconds = int(np.ceil(bench.duration_s)) + 1
    for policy in bench.policies:
        model, args = bench.server(policy, 1000 * slo_s)
        log(f"{policy}: serving {model} {' '.join(args)}")
        with ServerProcess("glideserve", model, log_path=out / f"{policy}.log", extra_args=args,
                           ready_timeout_s=bench.ready_timeout_s) as server:
            records, samples = asyncio.run(_run_policy(server.url, schedule, prompts, slo_s, timeout_s))
        levels = score_policy(records, bench.duration_s, toy_clip)
        result.policies[policy] = {"levels": levels, "timeline": per_second(records, seconds), "samples": samples}
        o = levels["overall"]
        log(f"  on time {o['on_time']:.3f}, judge all-correct {o['judge_all_correct']:.3f}, "
            f"goodput {o['goodput_per_s']:.3f}/s, served by {o['served_by']}")
        from glideserve.bench.records import write_records_csv

        write_records_csv(out / f"{policy}.csv", records)
    return result
