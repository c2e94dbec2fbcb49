"""One denoiser forward of 8 rows with 0, 1, 4 or 8 distinct adapters: glideserve's per-row
LoRA layer against peft's mixed-adapter batch path (``adapter_names``), side by side.

Both paths run the same transformer weights on the same inputs (8 unguided rows of the
model's default size, one prompt embedding each, one timestep each):

- ``glideserve``: the engine's own model with its adapters read from the LoRA folder and
  its layers wrapped by ``install_row_lora``; the rows' adapters set for the forward.
- ``peft``: a second copy of the pipeline with the same files loaded by diffusers'
  ``load_lora_weights`` (peft LoRA layers), each LoRA layer given ``adapter_names`` per
  row, as peft's ``PeftModel`` forward does with its pre-forward hooks. peft's path takes
  one adapter per row at the scale it was loaded with; glideserve's takes several per
  row with per-row scales, which this benchmark does not use.

Both outputs are compared (max abs difference) before timing. Rounds alternate the
paths and configurations; the table gives the median milliseconds per forward.

    python benchmarks/lora_peft_compare.py [--model glide-small] [--rank 8] [--iters 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora_cost import ROWS, TARGETS, write_adapters  # noqa: E402

from glideserve import Engine, GenerationParams  # noqa: E402
from glideserve.models.loading import load_pipeline  # noqa: E402
from glideserve.runner.lora import install_row_lora  # noqa: E402

CONFIGS = {0: [None] * ROWS, 1: ["lora0"] * ROWS, 4: [f"lora{i % 4}" for i in range(ROWS)],
           8: [f"lora{i}" for i in range(ROWS)]}


def inputs(engine: Engine):
    family, spec = engine.core.runner.family, engine.core.spec
    conds = family.encode([f"a red circle {i}" for i in range(ROWS)])
    cond = {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(ROWS, *spec.latent_shape(spec.default_height, spec.default_width), generator=generator)
    timesteps = torch.linspace(900, 100, ROWS)
    return latents, timesteps, cond


def glideserve_forward(engine: Engine, folder: str):
    runner = engine.core.runner
    family, store = runner.family, runner.loras
    denoiser = family.denoiser_of(family.pipe)
    adapters = {}
    for name in CONFIGS[ROWS]:
        adapters[name] = store.get(name)
        install_row_lora(denoiser, adapters[name].layers, family.lora_rows)

    def forward(rows, latents, timesteps, cond):
        per_row = [((adapters[name], 1.0),) if name else () for name in rows]
        with family.lora_rows.rows(per_row, family.device):
            return family.forward(latents, timesteps, cond)
    return forward


def peft_forward(model: str, folder: str):
    from peft.tuners.lora import LoraLayer

    pipe = load_pipeline(model)
    for name in CONFIGS[ROWS]:
        pipe.load_lora_weights(folder, weight_name=f"{name}.safetensors", adapter_name=name)
    transformer = pipe.transformer
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    current: dict[str, list[str]] = {}

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": current["names"]}

    for layer in layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)

    def forward(rows, latents, timesteps, cond):
        # peft narrows by sub-batch index, so every LoRA layer must see the rows as its batch dimension.
        current["names"] = [name or "__base__" for name in rows]
        return transformer(hidden_states=latents, timestep=timesteps, return_dict=False, **cond)[0]
    return forward


def timed(forward, rows, args, iters: int) -> float:
    with torch.inference_mode():
        forward(rows, *args)
        start = time.perf_counter()
        for _ in range(iters):
            forward(rows, *args)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="glide-small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_adapters(args.model, Path(folder), ROWS, args.rank)
        engine = Engine.from_pretrained(args.model, lora_dir=folder, max_batch_rows=ROWS, default_cache="none",
                                        profile=False)
        engine.generate([GenerationParams("warm-up", num_inference_steps=1, seed=0)])
        paths = {"glideserve": glideserve_forward(engine, folder), "peft": peft_forward(args.model, folder)}
        data = inputs(engine)
        with torch.inference_mode():
            plain = paths["glideserve"](CONFIGS[0], *data)
            for n, rows in CONFIGS.items():
                ours, theirs = (paths[p](rows, *data) for p in ("glideserve", "peft"))
                print(f"{n} distinct adapters: max |glideserve - peft| = {(ours - theirs).abs().max().item():.2e} "
                      f"(the adapters move the output by {(ours - plain).abs().max().item():.2e})")
        samples = {(p, n): [] for p in paths for n in CONFIGS}
        for _ in range(args.rounds):
            for n, rows in CONFIGS.items():
                for p, forward in paths.items():
                    samples[(p, n)].append(timed(forward, rows, data, args.iters))
    median = {key: statistics.median(values) for key, values in samples.items()}
    print(f"\n{args.model}, {ROWS} unguided rows, rank {args.rank} on {', '.join(TARGETS)}, "
          f"median of {args.rounds} rounds x {args.iters} forwards")
    print("| distinct adapters | glideserve ms | peft ms | peft / glideserve |")
    print("|---:|---:|---:|---:|")
    for n in CONFIGS:
        ours, theirs = median[("glideserve", n)], median[("peft", n)]
        print(f"| {n} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
