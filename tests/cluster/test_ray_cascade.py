"""A cascade on Ray Serve: the allocator (MILP) sets the two models' replica counts live from demand."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from glideserve.cluster.config import parse_config  # noqa: E402
from glideserve.cluster.runtime import ClusterRuntime  # noqa: E402
from live_server import free_port  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("glideserve_cascade", "glideserve_cluster")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_the_allocator_sizes_the_cascade_replicas_from_demand(tmp_path):
    config = parse_config({
        "port": free_port(), "slo_ms": 2500,
        "models": [{"name": "glide-turbo", "replicas": {"min": 1, "max": 2}, "resources": {"num_cpus": 0.5}},
                   {"name": "glide-base", "replicas": {"min": 1, "max": 2}, "resources": {"num_cpus": 0.5}}],
        "cascade": {"light": "glide-turbo", "heavy": "glide-base", "interval_s": 1, "workers": 3},
        "ray": {"num_cpus": 2}})
    runtime = ClusterRuntime(config, tmp_path / "run")
    runtime.up(ready_timeout_s=600)
    try:
        models = httpx.get(f"{runtime.url}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models][:2] == ["cascade", "glide-base"]

        async def load(rate: float, seconds: float):
            async with httpx.AsyncClient(timeout=300) as client:
                sends = []
                for i in range(int(rate * seconds)):
                    sends.append(asyncio.create_task(client.post(
                        f"{runtime.url}/v1/images/generations",
                        json={"prompt": "a red circle left of a blue square", "seed": i, "response_format": "url"})))
                    await asyncio.sleep(1 / rate)
                return await asyncio.gather(*sends)

        answers = asyncio.run(load(4, 6))
        assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers if a.status_code != 200]
        served = {a.json()["data"][0]["served_by"] for a in answers}
        assert served <= {"glide-turbo", "glide-base"}
        assert all(a.json()["data"][0]["cascade"] is not None for a in answers)
        # The plan splits 3 workers between the models (within 1..2 each) and Ray Serve carries it out.
        deadline = time.monotonic() + 120
        while True:
            m = _metrics(runtime.url)
            planned = {name: int(m.get(f'glideserve_cluster_target_replicas{{model="{name}"}}', 0))
                       for name in ("glide-turbo", "glide-base")}
            running = {name: int(m.get(f'glideserve_cluster_replicas{{model="{name}"}}', 0)) for name in planned}
            if m["glideserve_cascade_planned_demand"] > 0 and running == planned:
                break
            assert time.monotonic() < deadline, f"replicas {running} never matched the plan {planned}"
            time.sleep(1)
        assert sum(planned.values()) == 3 and all(1 <= n <= 2 for n in planned.values())
    finally:
        runtime.down()
