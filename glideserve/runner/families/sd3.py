"""SD3 / SD3.5 (MMDiT) family: per-row timesteps through ``SD3Transformer2DModel``."""

from __future__ import annotations

import torch

from glideserve.runner.families.base import Cond, DenoiserFamily


class SD3Family(DenoiserFamily):
    """``StableDiffusion3Pipeline`` components driven step by step (flow matching)."""

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_sequence_length = max_sequence_length

    def encode(self, prompts: list[str]) -> list[Cond]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return [{"encoder_hidden_states": embeds[i:i + 1], "pooled_projections": pooled[i:i + 1]}
                for i in range(len(prompts))]

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.pipe.transformer(hidden_states=latents, timestep=timesteps, return_dict=False, **cond)[0]

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor
