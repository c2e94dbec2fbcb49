"""What a loaded model accepts: the facts request validation and the scheduler need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about a loaded pipeline, derived once from its configs.

    ``size_multiple`` is the granularity of valid image sides (VAE factor x patch size);
    ``tokens_per_latent`` converts an image size into the latent tokens one batch row costs.
    """

    name: str
    family: str  # "sd3", "sd15" or "sdxl"
    latent_channels: int
    vae_scale_factor: int
    patch_size: int
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    samplers: tuple[str, ...]
    default_sampler: str
    max_prompt_tokens: int
    max_side: int | None = None  # largest image side the denoiser can take (SD3: its position table)
    cache_policies: tuple[str, ...] = ("none",)  # step-caching policy kinds its block loop implements
    flow_matching: bool = False  # the denoiser predicts a flow velocity (SD3): latent-aware denoising applies

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def tokens_per_row(self, height: int, width: int) -> int:
        return (height // self.size_multiple) * (width // self.size_multiple)
