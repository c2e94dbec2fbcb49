"""SD1.x/2.x and SDXL (UNet) families: per-row timesteps through ``UNet2DConditionModel``."""

from __future__ import annotations

import torch

from glideserve.cache.policy import CachePolicy
from glideserve.errors import ModelLoadError
from glideserve.params import GenerationParams
from glideserve.runner.families.base import Cond, DenoiserFamily
from glideserve.runner.families.registry import register_family
from glideserve.runner.families.unet_loop import UNetBlockLoop
from glideserve.runner.samplers import Sampler


@register_family
class SD15Family(DenoiserFamily):
    """``StableDiffusionPipeline`` components driven step by step."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    cache_policies = ("none", "deepcache")
    default_steps = 50
    default_guidance = 7.5
    denoiser_prefix = "unet"

    @staticmethod
    def denoiser_of(pipe):
        return pipe.unet

    @staticmethod
    def repeated_blocks(denoiser) -> list:
        mid = [] if denoiser.mid_block is None else [denoiser.mid_block]
        return [*denoiser.down_blocks, *mid, *denoiser.up_blocks]

    @classmethod
    def check_denoiser(cls, denoiser) -> None:
        if denoiser.config.time_cond_proj_dim is not None:
            raise ModelLoadError("guidance-distilled UNets (time_cond_proj_dim, e.g. LCM) are not supported yet")

    @classmethod
    def supported_cache_policies(cls, denoiser) -> tuple[str, ...]:
        # DeepCache skips the deeper path of a UNet: there must be one.
        return cls.cache_policies if len(denoiser.config.block_out_channels) >= 2 else ("none",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = UNetBlockLoop(self.pipe.unet, self.lora_rows)

    def encode(self, prompts: list[str]) -> list[Cond]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return [{"encoder_hidden_states": embeds[i:i + 1]} for i in range(len(prompts))]

    def init_latents(self, params: GenerationParams, generator: torch.Generator, sampler: Sampler) -> torch.Tensor:
        return super().init_latents(params, generator, sampler) * sampler.scheduler.init_noise_sigma

    def cache_bytes(self, policy: CachePolicy, params: GenerationParams) -> int:
        if policy.kind != "deepcache":
            return 0
        # DeepCache keeps the second-to-last up block's output, at the latent resolution.
        channels = self.pipe.unet.config.block_out_channels[1]
        _, height, width = self.spec.latent_shape(params.height, params.width)
        rows = 2 if params.uses_cfg else 1
        return rows * channels * height * width * torch.finfo(self.dtype).bits // 8

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor


@register_family
class SDXLFamily(SD15Family):
    """``StableDiffusionXLPipeline`` components: two text encoders plus size conditioning."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    default_guidance = 5.0

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

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor
