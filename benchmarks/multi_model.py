"""Two models behind one engine loop: how step time is shared, and what reloading costs.

Part 1 (both resident): N requests for each model arrive at once; every step's
duration is recorded per model while both have work. Fair sharing gives each model
about half the step time, whatever their step costs.

Part 2 (``max_loaded_models=1``): requests alternate between the models, one at a time,
so every request after the first finds its model unloaded. It reports the loads, the
mean load time and the request latency against the same requests with both resident.

    python benchmarks/multi_model.py [--models glide-small glide-tiny] [--requests 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict

from glideserve import AsyncEngine, GenerationParams
from glideserve.outputs import GenerationResult, RequestFailed


async def finish(stream) -> float:
    start = time.perf_counter()
    async for event in stream:
        if isinstance(event, RequestFailed):
            raise RuntimeError(f"{event.request_id} failed: {event.message}")
        if isinstance(event, GenerationResult):
            return time.perf_counter() - start
    raise RuntimeError("stream ended without a result")


async def share(engine: AsyncEngine, names: list[str], requests: int, steps: int) -> None:
    log: list[tuple[float, str, float]] = []  # (end time, model, seconds) of every step
    engine.add_step_listener(lambda s: log.append((time.perf_counter(), s.model, s.duration_s)))
    start = time.perf_counter()
    streams = [await engine.add_request(GenerationParams(f"a red circle {i}", num_inference_steps=steps, seed=i,
                                                         model=name))
               for i in range(requests) for name in names]
    latencies = await asyncio.gather(*(finish(s) for s in streams))
    done = {name: start + max(latencies[k::len(names)]) for k, name in enumerate(names)}
    both_busy_until = min(done.values())
    seconds, counts = defaultdict(float), defaultdict(int)
    for end, model, duration in log:
        if end <= both_busy_until:
            seconds[model] += duration
            counts[model] += 1
    total = sum(seconds.values())
    print(f"both resident, {requests} requests x {steps} steps per model, arriving together; "
          f"steps counted while both had work ({both_busy_until - start:.1f} s):")
    print("| model | steps | ms per step | share of step time | last image after s |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        print(f"| {name} | {counts[name]} | {seconds[name] / max(1, counts[name]) * 1e3:.1f} | "
              f"{seconds[name] / total:.0%} | {done[name] - start:.1f} |")


async def alternate(engine: AsyncEngine, names: list[str], requests: int, steps: int) -> list[float]:
    latencies = []
    for i in range(requests):
        params = GenerationParams("a blue square", num_inference_steps=steps, seed=i, model=names[i % len(names)])
        latencies.append(await finish(await engine.add_request(params)))
    return latencies


async def main_async(args) -> None:
    names = [m.split("=")[0] for m in args.models]
    engine = AsyncEngine.from_models(args.models, default_cache="none")
    await engine.start()
    await share(engine, names, args.requests, args.steps)
    warm = await alternate(engine, names, args.requests, args.steps)
    await engine.shutdown()

    engine = AsyncEngine.from_models(args.models, default_cache="none", max_loaded_models=1)
    await engine.start()
    before = {c["name"]: c["loads"] for c in engine.model_cards()}
    cold = await alternate(engine, names, args.requests, args.steps)
    cards = engine.model_cards()
    await engine.shutdown()
    loads = sum(c["loads"] - before[c["name"]] for c in cards)
    print(f"\nalternating {args.requests} requests one at a time ({args.steps} steps):")
    print("| weights budget | loads | mean load s | median latency s |")
    print("|---|---:|---:|---:|")
    print(f"| all resident | 0 | - | {statistics.median(warm):.2f} |")
    print(f"| one model | {loads} | {statistics.mean(c['load_s'] for c in cards):.2f} | "
          f"{statistics.median(cold):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["glide-small", "glide-tiny"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
