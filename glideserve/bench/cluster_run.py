"""``glideserve bench cluster``: throughput of the Ray Serve deployment at several replica counts, with the
single-machine server as the baseline, in one run on one machine.

Each system gets the same machine's CPUs: one ``glideserve serve`` process, or R replicas with
``cpus / R`` each (each replica's torch threads follow its CPUs). After a warm-up, ``requests``
generations are sent at once (a closed burst) and the time to the last answer gives images/s.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from glideserve.bench.server_process import ServerProcess, free_port

PROMPTS = ("a red circle", "a blue square left of a green triangle", "two yellow stars", "a purple circle above "
           "an orange square", "a green triangle and a red square")


async def burst(url: str, requests: int, seed0: int = 0, timeout_s: float = 900.0) -> dict:
    """Send ``requests`` generations at once; images/s from the first send to the last answer."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        async def one(i: int) -> tuple[int, float]:
            start = time.perf_counter()
            answer = await client.post(f"{url}/v1/images/generations",
                                       json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed0 + i,
                                             "response_format": "url"})
            return answer.status_code, time.perf_counter() - start

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ok = [latency for status, latency in results if status == 200]
    return {"requests": requests, "ok": len(ok), "wall_s": round(wall, 3),
            "images_per_s": round(len(ok) / wall, 3),
            "p50_s": round(statistics.median(ok), 3) if ok else None}


def measure(url: str, requests: int, warmup: int) -> dict:
    asyncio.run(burst(url, warmup, seed0=10_000))
    return asyncio.run(burst(url, requests))


def single_machine(model: str, requests: int, warmup: int, log_dir: Path) -> dict:
    with ServerProcess("glideserve", model, log_path=log_dir / "serve.log",
                       extra_args=("--no-profile", "--max-queue", str(4 * requests))) as server:
        return {"system": "glideserve serve", "replicas": 1, **measure(server.url, requests, warmup)}


def cluster(model: str, replicas: int, cpus: int, requests: int, warmup: int, run_dir: Path) -> dict:
    from glideserve.cluster.config import parse_config
    from glideserve.cluster.runtime import ClusterRuntime

    config = parse_config({
        "port": free_port(), "max_queue": 4 * requests,
        "models": [{"name": model, "replicas": {"min": replicas, "max": replicas},
                    "resources": {"num_cpus": cpus / replicas},
                    "engine": {"profile": False, "max_queue": 4 * requests}}],
        "ray": {"num_cpus": cpus}})
    runtime = ClusterRuntime(config, run_dir / f"replicas-{replicas}")
    started = time.perf_counter()
    runtime.up()
    ready_s = time.perf_counter() - started
    try:
        return {"system": "cluster (Ray Serve)", "replicas": replicas, "cpus_per_replica": cpus / replicas,
                "ready_s": round(ready_s, 1), **measure(runtime.url, requests, warmup)}
    finally:
        runtime.down()


def run(model: str, replica_counts: list[int], cpus: int, requests: int, warmup: int, out: Path | None,
        run_dir: Path) -> list[dict]:
    rows = [single_machine(model, requests, warmup, run_dir)]
    rows += [cluster(model, r, cpus, requests, warmup, run_dir) for r in replica_counts]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": model, "cpus": cpus, "requests": requests, "rows": rows}, indent=2)
                       + "\n", encoding="utf-8")
    return rows
