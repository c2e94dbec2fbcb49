"""LoRA rows and compiled blocks: run a LoRA step's blocks eager (around) or inside the compiled graphs?

8 unguided requests (one row each) on one engine compiled at the 8-row bucket, in four
configurations: no adapter, 1, 4 and 8 distinct adapters. "around" is what the engine
does (a step with LoRA rows runs its blocks eager); "inside" lets the compiled blocks
trace the per-row LoRA layers too, which makes dynamo compile new graphs for each mix
of adapters (counted here), after which the step runs compiled. Also reported: the eager
engine, as the reference. Median ms per step over alternating rounds.

    python benchmarks/compile_lora.py [--model glide-small] [--rank 8] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch._dynamo.config
from lora_cost import ROWS, adapter_mixes, parse_args, step_seconds, write_adapters
from torch._dynamo.utils import counters

from glideserve import Engine


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    configs = adapter_mixes()
    with tempfile.TemporaryDirectory() as folder:
        write_adapters(args.model, Path(folder), ROWS, args.rank)
        options = dict(lora_dir=folder, max_batch_rows=ROWS, default_cache="none")
        engines = {"eager": Engine.from_pretrained(args.model, **options),
                   "around": Engine.from_pretrained(args.model, compile=True, compile_buckets=(ROWS,), **options),
                   "inside": Engine.from_pretrained(args.model, compile=True, compile_buckets=(ROWS,), **options)}
        inside = engines["inside"].core.runner
        inside.family.loop.lora_inside_compiled = True
        inside.compiled.frozen = False  # let it compile the LoRA mixes it meets
        torch._dynamo.config.recompile_limit = 256  # and never silently fall back to eager
        graphs = {}
        for name, engine in engines.items():
            for n, rows in configs.items():  # warm-up; for "inside" this is where each mix compiles
                before = counters["stats"]["unique_graphs"]
                step_seconds(engine, rows, 5)
                if name == "inside":
                    graphs[n] = counters["stats"]["unique_graphs"] - before
        samples = {(name, n): [] for name in engines for n in configs}
        for _ in range(args.rounds):
            for n, rows in configs.items():
                for name, engine in engines.items():
                    samples[(name, n)].append(step_seconds(engine, rows, args.steps))
    print(f"{args.model}, {ROWS} rows (unguided requests), rank {args.rank}, median of {args.rounds} rounds; "
          "ms per step")
    print("| distinct adapters | eager | compiled, LoRA around | compiled, LoRA inside | new graphs (inside) |")
    print("|---:|---:|---:|---:|---:|")
    for n in configs:
        cells = [f"{statistics.median(samples[(name, n)]) * 1e3:.1f}" for name in engines]
        print(f"| {n} | {' | '.join(cells)} | {graphs[n]} |")


if __name__ == "__main__":
    main()
