"""Execution options shared by ``glideserve serve`` and ``glideserve generate``: compile, kernels, memory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

CompileOpt = Annotated[bool, typer.Option(
    "--compile/--no-compile", help="Compile the denoiser's blocks with torch.compile at start-up (one graph per "
                                   "row bucket and image size; see docs/performance.md).")]
CompileModeOpt = Annotated[str, typer.Option(
    help="torch.compile mode: default, max-autotune-no-cudagraphs, or reduce-overhead (CUDA graphs; CUDA only).")]
CompileBucketsOpt = Annotated[Optional[str], typer.Option(
    help="Row counts to compile, e.g. 1,2,4,8,16 (default: powers of two up to --max-batch-rows); a step's rows "
         "are padded up to the next one.")]
AttentionOpt = Annotated[str, typer.Option(
    help="Attention kernel of PyTorch's SDPA: auto (PyTorch chooses), flash, efficient, cudnn or math.")]
WarmSizeOpt = Annotated[Optional[list[str]], typer.Option(
    "--warm-size", help="Image size WIDTHxHEIGHT to compile (with --compile) and profile at start-up (repeatable; "
                        "default: the model's default size). Other sizes run eager.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    help="fp8: store the denoiser blocks' linear weights in float8 (weight-only; Ada/Hopper GPUs or CPU).")]
MemoryFractionOpt = Annotated[Optional[float], typer.Option(
    min=0.01, max=1.0, help="CUDA: size the step's token budget and the feature caches' budget from this fraction "
                            "of the GPU's memory (measured activations; see docs/gpu.md).")]


def parse_buckets(text: str | None) -> tuple[int, ...]:
    """``1,2,4`` as a tuple of row counts (ValueError naming the option otherwise)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--compile-buckets must be comma-separated row counts such as 1,2,4,8, got {text!r}") \
            from None


def execution_options(compile: bool, compile_mode: str, compile_buckets: str | None, attention: str,
                      quantize: str | None, gpu_memory_fraction: float | None = None,
                      warm_sizes: list[str] | None = None) -> dict:
    """EngineConfig fields for these options."""
    from glideserve.params import parse_size

    sizes = tuple(parse_size(text) for text in warm_sizes or [])
    return dict(compile=compile, compile_mode=compile_mode, compile_buckets=parse_buckets(compile_buckets),
                attention=attention, quantize=quantize, gpu_memory_fraction=gpu_memory_fraction,
                **({"profile_sizes": sizes} if sizes else {}))
