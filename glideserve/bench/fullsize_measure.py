"""In-process measurements of ``glideserve bench fullsize``: diffusers' own pipeline, a bare denoiser
forward, FLOP counts and the matmul peak, all on one device in one dtype.

Times are wall-clock medians after warm-up, with the device synchronised around each call (CUDA kernels
are asynchronous: without it a call would look as fast as its launch). FLOPs come from torch's
``FlopCounterMode`` (matmuls, convolutions and attention, 2 FLOPs per multiply-add), the same counter
``glideserve.bench.flops`` uses.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from glideserve.bench.fullsize_models import ServingSettings

GIB = 2**30


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: str, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` discarded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (it runs once, for real)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return float(counter.get_total_flops())


def denoiser_of(pipe):
    """The pipeline's denoiser: SD3's transformer or SDXL's UNet."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def pipeline_kwargs(settings: ServingSettings, *, steps: int, side: int, batch: int, seed: int, device: str) -> dict:
    """Keyword arguments of ``pipe(prompt, **kwargs)`` for ``batch`` images at ``side`` x ``side`` with the
    model's guidance (CFG: two denoiser rows per image) and, for SD3, the served T5 length."""
    kwargs = dict(num_inference_steps=steps, guidance_scale=settings.guidance, height=side, width=side,
                  num_images_per_prompt=batch, generator=torch.Generator(device).manual_seed(seed))
    if settings.max_sequence_length is not None:
        kwargs["max_sequence_length"] = settings.max_sequence_length
    return kwargs


def capture_denoiser_call(pipe, prompt: str, kwargs: dict) -> tuple[tuple, dict, float]:
    """Run the pipeline for one step and return the denoiser's first ``(args, kwargs)`` (the exact shapes and
    dtypes the pipeline feeds it) and the FLOPs of that whole one-step call (text encoders, one denoiser
    step, VAE decode)."""
    captured: list[tuple[tuple, dict]] = []
    handle = denoiser_of(pipe).register_forward_pre_hook(
        lambda module, args, kw: captured.append((args, kw)) if not captured else None, with_kwargs=True)
    try:
        flops = count_flops(lambda: pipe(prompt, **{**kwargs, "num_inference_steps": 1}))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the pipeline never called its denoiser; cannot measure a denoising step")
    return captured[0][0], captured[0][1], flops


def measure_forward(pipe, args: tuple, kwargs: dict, device: str, repeats: int) -> dict:
    """A bare denoiser forward on captured inputs: ``{"rows", "seconds", "flops"}``."""
    denoiser = denoiser_of(pipe)

    def forward():
        with torch.inference_mode():
            denoiser(*args, **kwargs)

    rows = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0]
    return {"rows": int(rows), "seconds": median_seconds(forward, device, repeats=repeats, warmup=2),
            "flops": count_flops(forward)}


def measure_pipeline(pipe, prompt: str, kwargs: dict, device: str, repeats: int) -> dict:
    """Latency of whole ``pipe(prompt, **kwargs)`` calls (median after one warm-up) and, on CUDA, the peak
    memory allocated during the timed calls, weights included."""
    def call():
        with torch.inference_mode():
            pipe(prompt, **kwargs)

    call()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(call, device, repeats=repeats, warmup=0)
    result = {"batch": kwargs["num_images_per_prompt"], "latency_s": seconds,
              "images_per_s": kwargs["num_images_per_prompt"] / seconds}
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return result


def measure_peak_flops(device: str, dtype: torch.dtype, seconds: float = 1.5, repeats: int = 3) -> dict:
    """Best sustained FLOP/s of square matmuls in ``dtype`` on ``device`` (8192 wide on a GPU, where smaller
    ones cannot fill the tensor cores; 1024 on a CPU): ``{"flops", "matmul_size", "dtype"}``."""
    size = 8192 if device.startswith("cuda") else 1024
    name = str(dtype).removeprefix("torch.")
    if not device.startswith("cuda") and dtype == torch.float32:
        from glideserve.bench.metrics import measure_matmul_peak_flops  # the other commands' CPU figure

        return {"flops": measure_matmul_peak_flops(size, seconds, repeats), "matmul_size": size, "dtype": name}
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            # A batch of launches per check keeps the host's timing loop off the critical path.
            for _ in range(8):
                torch.matmul(a, b, out=out)
            count += 8
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats:
                break
        best = max(best, count * 2.0 * size**3 / elapsed)
    return {"flops": best, "matmul_size": size, "dtype": name}


def measure_in_process(folder: str, settings: ServingSettings, *, device: str, dtype: torch.dtype, steps: int,
                       side: int, batches: tuple[int, ...], repeats: int, seed: int, prompt: str, log=print) -> dict:
    """Everything measured inside the benchmark process, which then frees the device for the servers.

    Loads ``folder`` with glideserve's loader (as the servers do), measures the matmul peak, then per batch
    size diffusers' pipeline latency and memory and a bare denoiser forward at the pipeline's own rows, and
    the FLOPs of one image: one counted one-step call plus ``steps - 1`` denoiser forwards.
    """
    import gc

    from glideserve.models.loading import load_pipeline

    peak = measure_peak_flops(device, dtype)
    log(f"{peak['dtype']} matmul peak on {device}: {peak['flops'] / 1e12:.3g} TFLOP/s")
    pipe = load_pipeline(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    weights_gib = torch.cuda.memory_allocated(device) / GIB if device.startswith("cuda") else None
    pipeline_rows, forwards, image_flops = [], [], None
    for batch in batches:
        kwargs = pipeline_kwargs(settings, steps=steps, side=side, batch=batch, seed=seed, device=device)
        args, call_kwargs, one_step_flops = capture_denoiser_call(pipe, prompt, kwargs)
        forward = {"batch": batch, **measure_forward(pipe, args, call_kwargs, device, max(repeats, 3))}
        forwards.append(forward)
        if batch == 1:
            image_flops = one_step_flops + (steps - 1) * forward["flops"]
        row = measure_pipeline(pipe, prompt, kwargs, device, repeats)
        row["flops"] = one_step_flops + (steps - 1) * forward["flops"]  # all ``batch`` images of the call
        pipeline_rows.append(row)
        log(f"diffusers pipeline, batch {batch}: {row['latency_s']:.3f} s; bare denoiser forward "
            f"({forward['rows']} rows): {forward['seconds'] * 1000:.1f} ms")
        del args, call_kwargs
    if image_flops is None:  # batch 1 not measured: per image from the smallest batch
        image_flops = pipeline_rows[0]["flops"] / pipeline_rows[0]["batch"]
    del pipe
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"peak": peak, "weights_memory_gib": weights_gib, "image_flops": image_flops,
            "pipeline": pipeline_rows, "forward": forwards}
