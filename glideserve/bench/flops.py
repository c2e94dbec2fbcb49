"""Count the model FLOPs of one image by running the diffusers pipeline once under torch's FLOP counter.

The count covers everything the pipeline runs for an image: text encoders, every
denoiser evaluation (two rows per step with classifier-free guidance) and the VAE
decode. torch's ``FlopCounterMode`` counts matmuls, convolutions and attention
(2 FLOPs per multiply-add), the operations MFU is defined over.
"""

from __future__ import annotations

import torch

from glideserve.params import GenerationParams, parse_size


def count_flops_per_image(model: str, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                          size: str | None = None, prompt: str = "a red circle on a blue background") -> float:
    """FLOPs to generate one image from ``model`` with these settings (``None``: the model's defaults)."""
    from torch.utils.flop_counter import FlopCounterMode

    from glideserve.models.loading import load_pipeline, serving_defaults, spec_from_pipeline

    defaults = serving_defaults(model) if not str(model).endswith((".safetensors", ".ckpt", ".pt")) else {}
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    spec = spec_from_pipeline(pipe, name=str(model), defaults=defaults)
    height, width = parse_size(size) if size else (None, None)
    params = GenerationParams(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              height=height, width=width, seed=0).resolve(spec)
    kwargs = dict(num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                  height=params.height, width=params.width, generator=torch.Generator("cpu").manual_seed(0))
    if spec.family == "sd3" and "max_sequence_length" in defaults:
        kwargs["max_sequence_length"] = int(defaults["max_sequence_length"])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe(params.prompt, **kwargs)
    return float(counter.get_total_flops())
