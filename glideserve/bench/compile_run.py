"""``glideserve bench compile``: compiled against eager steps of one model, at several batch sizes, in one run.

Both engines are loaded in the same process and measured alternately, so the ratio is
taken under the same conditions. At each row count ``r`` the engine runs ``r`` requests
without guidance (one row each) admitted together, so every step denoises exactly ``r``
rows; the figure is the median denoise stage of those steps (the blocks, the
embedders and the output head; prefill and decode are left out). The compiled engine
compiles one bucket per row count (plus any ``padded`` row counts' buckets are the next
larger ones), and its warm-up time per bucket is the compile cost a server pays at start.
"""

from __future__ import annotations

import statistics
import time

from glideserve.engine.core import EngineCore
from glideserve.params import GenerationParams
from glideserve.toy.dataset import all_combinations, caption


def _steady_denoise_s(core: EngineCore, rows: int, steps: int, size: tuple[int, int] | None) -> list[float]:
    combos = all_combinations()
    height, width = size or (None, None)
    for i in range(rows):
        core.add_request(GenerationParams(caption(*combos[(i * 37) % len(combos)]), seed=i, guidance_scale=1.0,
                                          num_inference_steps=steps, height=height, width=width))
    times = []
    while core.has_unfinished():
        core.step()
        stats = core.last_step
        if stats.num_rows == rows and stats.timing.denoise_s > 0:
            times.append(stats.timing.denoise_s)
    return times


def run_compile_bench(model: str, rows: list[int], padded: list[int], steps: int = 20, repeats: int = 3,
                      size: tuple[int, int] | None = None, progress=print) -> dict:
    """Measure; returns the JSON-ready result (``rows`` per row count, ``compile`` what it cost)."""
    if not rows or any(r < 1 for r in rows + padded):
        raise ValueError("--rows needs positive row counts, e.g. 1,4,16")
    max_rows = max(rows + padded)
    buckets = tuple(sorted(set(rows)))
    if max(padded, default=0) > buckets[-1]:
        raise ValueError(f"--padded row counts must not exceed the largest of --rows ({buckets[-1]})")
    options = dict(max_batch_rows=max_rows, max_waiting=max_rows, profile=False,
                   profile_sizes=(size,) if size else ())
    eager = EngineCore.load(model, **options)
    start = time.perf_counter()
    compiled = EngineCore.load(model, compile=True, compile_buckets=buckets, **options)
    load_s = time.perf_counter() - start
    stats = compiled.runner.compiled.stats
    progress(f"compiled {stats.graphs} graphs for buckets {list(buckets)} in {stats.compile_s:.1f} s")
    results = []
    for count in sorted(set(rows + padded)):
        samples = {"eager": [], "compiled": []}
        for _ in range(repeats):  # alternate, so drift in the machine's speed hits both alike
            for name, core in (("eager", eager), ("compiled", compiled)):
                samples[name] += _steady_denoise_s(core, count, steps, size)
        eager_ms = 1000 * statistics.median(samples["eager"])
        compiled_ms = 1000 * statistics.median(samples["compiled"])
        bucket = compiled.runner.compiled.buckets.bucket(count)
        results.append({"rows": count, "bucket": bucket, "eager_ms": round(eager_ms, 3),
                        "compiled_ms": round(compiled_ms, 3), "speedup": round(eager_ms / compiled_ms, 3),
                        "steps_measured": len(samples["compiled"]),
                        "bucket_compile_s": round(next((s for label, s in stats.warmup.items()
                                                        if label.startswith(f"{bucket} rows ")), 0.0), 2)})
        progress(f"{count:>3} rows (bucket {bucket}): eager {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms, "
                 f"{eager_ms / compiled_ms:.2f}x")
    return {"model": model, "size": list(size) if size else None, "steps": steps, "repeats": repeats,
            "compile": {"buckets": list(buckets), "graphs": stats.graphs, "compile_s": round(stats.compile_s, 2),
                        "load_s": round(load_s, 2), "warmup_s": {k: round(v, 2) for k, v in stats.warmup.items()},
                        "eager_calls_after_warmup": stats.eager_calls},
            "rows": results}


def markdown_table(result: dict) -> str:
    lines = ["| rows | bucket | eager ms/step | compiled ms/step | speed-up | bucket compile s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['rows']} | {row['bucket']} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['bucket_compile_s']:.1f} |")
    return "\n".join(lines)
