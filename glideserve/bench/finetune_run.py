"""``glideserve bench finetune``: SLO attainment under a trace with and without a fine-tuning job, and the
job's progress idle and under load, in one run on one machine.

Both phases run the same server configuration (``glideserve serve --policy slack --cache none --data-dir
--lora-dir``); the second creates a long job first and measures its idle speed before the trace starts.
Capacity is 1 / the server's median isolated latency (10 requests one at a time after a warm-up, no job), the trace
is fitted to ``factor`` x that rate over ``duration`` seconds, and the SLO is ``slo_scale`` x the latency.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from glideserve.bench.arrivals import fit_trace, load_trace
from glideserve.bench.loadgen import RequestTemplate, measure_isolated_latency, run_open_loop, toy_captions
from glideserve.bench.metrics import outcome_figures
from glideserve.bench.server_process import ServerProcess

JOB = {"model": None, "training_file": "concept", "suffix": "bench-job", "seed": 0,
       "hyperparameters": {"n_steps": 100000, "batch_size": 8, "lora_rank": 8, "checkpoint_every": 100000}}


def _job_steps(url: str, job_id: str) -> int:
    return httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()["trained_steps"]


def _server(model: str, root: Path, name: str) -> ServerProcess:
    args = ("--policy", "slack", "--cache", "none", "--data-dir", str(root / "data"), "--lora-dir",
            str(root / "loras"), "--max-queue", "1024")
    return ServerProcess("glideserve", model, log_path=root / f"{name}.log", extra_args=args)


def phase(model: str, root: Path, with_job: bool, trace: Path, rate: float, slo_s: float, duration_s: float,
          idle_s: float) -> dict:
    name = "with job" if with_job else "no job"
    with _server(model, root, name.replace(" ", "-")) as server:
        result: dict = {"phase": name}
        job_id = None
        if with_job:
            created = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json={**JOB, "model": model}, timeout=60)
            created.raise_for_status()
            job_id = created.json()["id"]
            while httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()["status"] != "running":
                time.sleep(0.2)
            before, start = _job_steps(server.url, job_id), time.perf_counter()
            time.sleep(idle_s)
            result["job_steps_per_min_idle"] = round(60 * (_job_steps(server.url, job_id) - before)
                                                     / (time.perf_counter() - start), 1)
        schedule = fit_trace(load_trace(trace), target_rate=rate, duration_s=duration_s, seed=0)
        steps_before, start = (_job_steps(server.url, job_id), time.perf_counter()) if job_id else (0, 0.0)
        records = asyncio.run(run_open_loop(server.url, schedule, toy_captions(64), RequestTemplate(),
                                            slo_s=slo_s, timeout_s=120.0))
        if job_id:
            result["job_steps_per_min_under_load"] = round(60 * (_job_steps(server.url, job_id) - steps_before)
                                                           / (time.perf_counter() - start), 1)
            events = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "false"},
                               timeout=30).json()["data"]
            result["job_pauses"] = sum(e["message"].startswith("paused") for e in events)
            httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=30)
        figures = outcome_figures(records)
        result.update(rate=round(rate, 3), slo_s=round(slo_s, 3), requests=figures["requests"],
                      on_time=figures["on_time"], late=figures["late"], refused=figures["refused"],
                      dropped=figures["dropped"], slo_attainment=round(figures["slo_attainment"], 4))
        return result


def run(model: str, trace: Path, factor: float, duration_s: float, slo_scale: float, idle_s: float,
        out: Path | None, run_dir: Path | None = None) -> list[dict]:
    from glideserve.toy.concept import write_concept_dataset

    root = run_dir or Path(tempfile.mkdtemp(prefix="glideserve-bench-finetune-"))
    (root / "loras").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "concept").is_dir():
        write_concept_dataset(root / "data" / "concept", "pink", 240)
    with _server(model, root, "capacity") as server:
        latency = asyncio.run(measure_isolated_latency(server.url, toy_captions(64), RequestTemplate(), count=10))
    rate, slo_s = factor / latency, slo_scale * latency
    rows = [phase(model, root, with_job, trace, rate, slo_s, duration_s, idle_s) for with_job in (False, True)]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": model, "trace": trace.name, "factor": factor,
                                   "isolated_latency_s": round(latency, 4), "capacity_rps": round(1 / latency, 3),
                                   "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return rows
