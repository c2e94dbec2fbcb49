"""What per-row LoRA costs per step: a batch of 8 rows carrying 0, 1, 4 or 8 distinct adapters.

It writes 8 random rank-R adapters for the model's transformer (peft ``LoraConfig`` on
the attention projections, saved with the pipeline's ``save_lora_weights``) into a
temporary LoRA folder, then runs 8 unguided requests (one row each) through one
engine: with no adapter, all with the same adapter, 4 adapters (2 rows each) and 8
(one each). Each configuration is timed in steady state (every request running),
in rounds that alternate the configurations, and reported as the median seconds per
step and its ratio to no LoRA.

    python benchmarks/lora_cost.py [--model glide-small] [--rank 8] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glideserve import Engine, GenerationParams
from glideserve.models.loading import load_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ROWS = 8


def write_adapters(model: str, folder: Path, count: int, rank: int) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(model)
    for i in range(count):
        name = f"lora{i}"
        torch.manual_seed(i)
        pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                                init_lora_weights=False), adapter_name=name)
        type(pipe).save_lora_weights(folder, weight_name=f"{name}.safetensors",
                                     transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                                                      adapter_name=name))
        pipe.transformer.delete_adapters(name)


def step_seconds(engine: Engine, adapters_per_row: list[str | None], steps: int) -> float:
    """Mean seconds per step while all rows denoise (first and last steps left out)."""
    for i, name in enumerate(adapters_per_row):
        engine.add_request(GenerationParams(f"a red circle {i}", num_inference_steps=steps, guidance_scale=1.0,
                                            seed=i, lora=name or ()))
    engine.step()  # prefill and the first step
    times = []
    for _ in range(steps - 3):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return sum(times) / len(times)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="glide-small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def adapter_mixes() -> dict[int, list[str | None]]:
    """Each row's adapter, by the number of distinct adapters in the batch: 0, 1, 4 and 8."""
    return {0: [None] * ROWS, 1: ["lora0"] * ROWS, 4: [f"lora{i % 4}" for i in range(ROWS)],
            8: [f"lora{i}" for i in range(ROWS)]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    configs = adapter_mixes()
    with tempfile.TemporaryDirectory() as folder:
        write_adapters(args.model, Path(folder), ROWS, args.rank)
        engine = Engine.from_pretrained(args.model, lora_dir=folder, max_batch_rows=ROWS, default_cache="none")
        step_seconds(engine, configs[8], 5)  # warm-up: every adapter read and its layers wrapped
        samples: dict[int, list[float]] = {n: [] for n in configs}
        for _ in range(args.rounds):
            for n, rows in configs.items():
                samples[n].append(step_seconds(engine, rows, args.steps))
    base = statistics.median(samples[0])
    print(f"{args.model}, {ROWS} rows (unguided requests), rank {args.rank} on {', '.join(TARGETS)}, "
          f"median of {args.rounds} rounds")
    print("| distinct adapters | ms per step | ratio to no LoRA |")
    print("|---:|---:|---:|")
    for n, values in samples.items():
        median = statistics.median(values)
        print(f"| {n} | {median * 1e3:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
