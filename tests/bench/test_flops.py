"""FLOP counts of one image behave like the model: linear in steps, doubled denoiser work with CFG."""

from __future__ import annotations

import pytest

from glideserve.bench.flops import count_flops_per_image


def test_flops_grow_linearly_with_steps_and_double_with_guidance(tiny_sd3_dir):
    with_cfg = {n: count_flops_per_image(tiny_sd3_dir, num_inference_steps=n, guidance_scale=5.0) for n in (1, 2, 4)}
    without = {n: count_flops_per_image(tiny_sd3_dir, num_inference_steps=n, guidance_scale=1.0) for n in (1, 2)}
    per_step = with_cfg[2] - with_cfg[1]
    assert per_step > 0
    assert with_cfg[4] - with_cfg[2] == pytest.approx(2 * per_step)
    # classifier-free guidance runs two rows per step: twice the denoiser work
    assert per_step == pytest.approx(2 * (without[2] - without[1]))


def test_flops_grow_with_image_size(tiny_sd3_dir):
    small = count_flops_per_image(tiny_sd3_dir, num_inference_steps=1, size="32x32")
    large = count_flops_per_image(tiny_sd3_dir, num_inference_steps=1, size="64x64")
    assert large > small
