"""SD3 / SD3.5 (MMDiT) family: per-row timesteps through ``SD3Transformer2DModel``."""

from __future__ import annotations

import torch

from glideserve.cache.policy import CachePolicy
from glideserve.params import GenerationParams
from glideserve.runner.families.base import Cond, DenoiserFamily
from glideserve.runner.families.registry import register_family
from glideserve.runner.families.sd3_loop import SD3BlockLoop

# Image-stream tensors of shape (rows, tokens, hidden) one request's cache holds, per policy;
# FORA holds per block the attention and MLP outputs (and SD3.5's second attention).
_CACHED_TENSORS = {"glideserve": 1, "taylorseer": 2, "teacache": 2, "fbcache": 2, "adaptive": 2}


@register_family
class SD3Family(DenoiserFamily):
    """``StableDiffusion3Pipeline`` components driven step by step (flow matching)."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    flow_matching = True
    cache_policies = ("none", "adaptive", "glideserve", "fora", "taylorseer", "teacache", "fbcache")
    default_cache = "adaptive"  # exact at low load; see docs/caching.md for why it is the default
    default_steps = 28
    default_guidance = 7.0
    denoiser_prefix = "transformer"

    @staticmethod
    def denoiser_of(pipe):
        return pipe.transformer

    @staticmethod
    def repeated_blocks(denoiser) -> list:
        return list(denoiser.transformer_blocks)

    @classmethod
    def patch_size(cls, denoiser) -> int:
        return denoiser.config.patch_size

    @classmethod
    def max_side(cls, denoiser, vae_factor: int) -> int | None:
        pos_max = denoiser.config.pos_embed_max_size  # the position table bounds the latent grid
        return pos_max * denoiser.config.patch_size * vae_factor if pos_max else None

    @classmethod
    def create(cls, pipe, spec, device, dtype, max_sequence_length=None) -> "SD3Family":
        return cls(pipe, spec, device, dtype, max_sequence_length=max_sequence_length or 256)

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_sequence_length = max_sequence_length
        self.loop = SD3BlockLoop(self.pipe.transformer, self.lora_rows)

    def encode(self, prompts: list[str]) -> list[Cond]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return [{"encoder_hidden_states": embeds[i:i + 1], "pooled_projections": pooled[i:i + 1]}
                for i in range(len(prompts))]

    def cache_bytes(self, policy: CachePolicy, params: GenerationParams) -> int:
        if not policy.enabled:
            return 0
        config = self.pipe.transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        per_tensor = (2 if params.uses_cfg else 1) * self.spec.tokens_per_row(params.height, params.width) \
            * hidden * torch.finfo(self.dtype).bits // 8
        if policy.kind == "fora":
            blocks = self.pipe.transformer.transformer_blocks
            return per_tensor * sum(3 if b.use_dual_attention else 2 for b in blocks)
        return per_tensor * _CACHED_TENSORS[policy.kind]

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor
