"""SD1.x/2.x and SDXL (UNet) families: per-row timesteps through ``UNet2DConditionModel``."""

from __future__ import annotations

import torch

from glideserve.params import GenerationParams
from glideserve.runner.families.base import Cond, DenoiserFamily
from glideserve.runner.samplers import Sampler


class SD15Family(DenoiserFamily):
    """``StableDiffusionPipeline`` components driven step by step."""

    def encode(self, prompts: list[str]) -> list[Cond]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return [{"encoder_hidden_states": embeds[i:i + 1]} for i in range(len(prompts))]

    def init_latents(self, params: GenerationParams, generator: torch.Generator, sampler: Sampler) -> torch.Tensor:
        return super().init_latents(params, generator, sampler) * sampler.scheduler.init_noise_sigma

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.pipe.unet(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                              return_dict=False)[0]

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor


class SDXLFamily(SD15Family):
    """``StableDiffusionXLPipeline`` components: two text encoders plus size conditioning."""

    def encode(self, prompts: list[str]) -> list[Cond]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return [{"encoder_hidden_states": embeds[i:i + 1], "text_embeds": pooled[i:i + 1]}
                for i in range(len(prompts))]

    def negative_cond(self, params: GenerationParams, positive: Cond) -> Cond | None:
        # SDXL pipelines zero the unconditional embeddings when no negative prompt is given.
        if params.negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            return {k: torch.zeros_like(v) for k, v in positive.items()}
        return None

    def row_cond(self, params: GenerationParams) -> Cond:
        size = (params.height, params.width)
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else None
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype,
                                               text_encoder_projection_dim=projection_dim)
        return {"time_ids": time_ids.to(self.device)}

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.pipe.unet(latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                              added_cond_kwargs=added, return_dict=False)[0]

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor
