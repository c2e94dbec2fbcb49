"""GPU-path rules checked on the CPU: fp8 weights, the VAE's safe dtype, device-independent noise, SDPA kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glideserve import Engine, GenerationParams
from glideserve.bench.quality import aggregate_comparison, engine_images, toy_cases
from glideserve.config import EngineConfig
from glideserve.runner.precision import Float8WeightOnlyLinear, quantize_fp8, vae_dtype


def test_fp8_linear_stores_a_quarter_of_fp32_and_stays_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    fp8 = Float8WeightOnlyLinear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and isinstance(fp8, torch.nn.Linear)
    assert fp8.weight.nbytes * 4 == linear.weight.nbytes
    x = torch.randn(8, 64)
    error = (fp8(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.05, f"fp8 weights changed the output by {error:.3f} (relative)"
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    assert quantize_fp8(block) == 2 and all(isinstance(m, Float8WeightOnlyLinear) for m in block[::2])


def test_fp8_model_keeps_the_judged_images():
    """glide-tiny with fp8 block weights: the toy judge reads the same captions, SSIM against exact stays high."""
    requests = [GenerationParams(case.prompt, seed=case.seed, num_inference_steps=12) for case in toy_cases(8, 1)]
    exact = engine_images("glide-tiny", requests)
    fp8 = engine_images("glide-tiny", requests, quantize="fp8")
    comparison = aggregate_comparison(fp8, exact)
    assert comparison.ssim > 0.9, comparison
    assert comparison.max_abs_diff > 0  # the weights really changed


def test_fp8_model_serves_lora_rows(tiny_sd3_dir, tmp_path):
    from test_lora import _make_lora

    _make_lora(tiny_sd3_dir, tmp_path, "style", seed=1)
    engine = Engine.from_pretrained(tiny_sd3_dir, max_sequence_length=16, quantize="fp8", lora_dir=str(tmp_path))
    plain, styled = engine.generate([GenerationParams("a cat", num_inference_steps=3, seed=1),
                                     GenerationParams("a cat", num_inference_steps=3, seed=1, lora="style")])
    assert np.abs(np.asarray(plain.image, int) - np.asarray(styled.image, int)).mean() > 1


def test_vae_is_upcast_only_where_float16_overflows():
    class Vae:
        def __init__(self, force_upcast):
            self.config = type("Config", (), {"force_upcast": force_upcast})()

    assert vae_dtype(Vae(True), torch.float16) == torch.float32
    assert vae_dtype(Vae(True), torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert vae_dtype(Vae(False), torch.float16) == torch.float16


def test_sdxl_in_float16_decodes_in_float32(tiny_sdxl_dir):
    engine = Engine.from_pretrained(tiny_sdxl_dir, dtype="float16")
    family = engine.core.runner.family
    assert family.pipe.unet.dtype == torch.float16
    assert family.pipe.vae.dtype == (torch.float32 if family.pipe.vae.config.force_upcast else torch.float16)
    image = engine.generate([GenerationParams("a cat", num_inference_steps=2, seed=0)])[0].image
    assert np.isfinite(np.asarray(image, float)).all()


def test_noise_is_drawn_in_float32_so_a_seed_means_the_same_in_every_dtype(tiny_sd3_dir):
    params = GenerationParams("a cat", seed=7).resolve(Engine.from_pretrained(tiny_sd3_dir).spec)
    noises = {}
    for dtype in ("float32", "bfloat16"):
        family = Engine.from_pretrained(tiny_sd3_dir, dtype=dtype).core.runner.family
        noises[dtype] = family.init_latents(params, torch.Generator("cpu").manual_seed(7), None)
    assert noises["bfloat16"].dtype == torch.bfloat16
    assert torch.equal(noises["bfloat16"], noises["float32"].to(torch.bfloat16))


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_pinned_attention_kernels_give_the_same_images(tiny_sd3_dir, kernel):
    requests = [GenerationParams("a cat", num_inference_steps=4, seed=s) for s in (1, 2)]
    auto = engine_images(tiny_sd3_dir, requests, max_sequence_length=16)
    pinned = engine_images(tiny_sd3_dir, requests, max_sequence_length=16, attention=kernel)
    assert aggregate_comparison(pinned, auto).max_abs_diff <= 2


def test_unavailable_attention_kernel_is_refused_at_load(tiny_sd3_dir):
    with pytest.raises(ValueError, match="attention 'efficient' is not available on cpu.*--attention auto"):
        Engine.from_pretrained(tiny_sd3_dir, attention="efficient")


@pytest.mark.parametrize("options, message", [
    ({"compile_mode": "reduce-overhead"}, "needs a CUDA device"),
    ({"compile_mode": "fast"}, "compile_mode must be one of"),
    ({"compile_buckets": (0, 4)}, "compile_buckets must be row counts"),
    ({"compile_buckets": (32,)}, r"1\.\.max_batch_rows \(16\)"),
    ({"attention": "fastest"}, "attention must be one of"),
    ({"quantize": "int4"}, "quantize must be one of fp8"),
    ({"gpu_memory_fraction": 1.5}, r"gpu_memory_fraction must be in \(0, 1\]"),
])
def test_execution_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(**options)
