"""What the runner needs from a model family: encode, draw noise, denoise, decode."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from glideserve.cache.policy import CachePolicy, StepKind
from glideserve.models.spec import ModelSpec
from glideserve.params import GenerationParams
from glideserve.runner.feature_cache import RowGroup
from glideserve.runner.lora import RowAdapters
from glideserve.runner.precision import vae_dtype
from glideserve.runner.samplers import Sampler

Cond = dict[str, torch.Tensor]  # conditioning tensors of one or more rows, batch dim first


class DenoiserFamily:
    """Adapter from one diffusers pipeline family to the runner.

    It calls the pipeline's components and helper methods (``encode_prompt``, the
    VAE, the image processor) exactly as that pipeline's ``__call__`` does, so every
    request reproduces the pipeline, but it never calls ``__call__``: batching
    across requests at different timesteps is the runner's job.

    Subclasses are registered (``registry.register_family``) and declare the facts
    that differ between families: ``name``, the diffusers ``pipeline_class`` they
    serve, ``flow_matching``, the ``cache_policies`` their block loop implements and
    the ``default_cache`` among them, ``default_steps``/``default_guidance``, and
    ``denoiser_of(pipe)``. Each sets ``loop``, its owned block loop: a callable
    ``(latents, timesteps, cond, groups) -> (prediction, step kinds)``.
    """

    name: str = ""
    pipeline_class: str = ""
    flow_matching: bool = False
    cache_policies: tuple[str, ...] = ("none",)
    default_cache: str = "none"  # what ``--cache auto`` means for this family
    default_steps: int = 50
    default_guidance: float = 7.5

    denoiser_prefix: str = ""  # the denoiser's key prefix in diffusers LoRA files

    @staticmethod
    def denoiser_of(pipe):
        """The pipeline's denoiser (transformer or UNet)."""
        raise NotImplementedError

    @classmethod
    def patch_size(cls, denoiser) -> int:
        return 1

    @staticmethod
    def repeated_blocks(denoiser) -> list[torch.nn.Module]:
        """The denoiser's blocks (the bulk of its compute), in call order."""
        raise NotImplementedError

    @classmethod
    def max_side(cls, denoiser, vae_factor: int) -> int | None:
        """Largest image side the denoiser can take, if it has one."""
        return None

    @classmethod
    def check_denoiser(cls, denoiser) -> None:
        """Raise ModelLoadError for a denoiser variant this family cannot serve."""

    @classmethod
    def supported_cache_policies(cls, denoiser) -> tuple[str, ...]:
        return cls.cache_policies

    @classmethod
    def create(cls, pipe, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
               max_sequence_length: int | None = None) -> "DenoiserFamily":
        return cls(pipe, spec, device, dtype)

    def __init__(self, pipe, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.dtype = dtype
        vae = getattr(pipe, "vae", None)
        if vae is not None and vae.dtype != vae_dtype(vae, dtype):
            vae.to(vae_dtype(vae, dtype))
        self.lora_rows = RowAdapters()  # set by the runner around each forward; narrowed by the block loop
        self.text_lora_rows = RowAdapters()  # set by the prompt encoder around each text-encoder call

    def encode(self, prompts: list[str]) -> list[Cond]:
        """One conditioning dict per prompt, each with a batch dimension of 1."""
        raise NotImplementedError

    def negative_cond(self, params: GenerationParams, positive: Cond) -> Cond | None:
        """Conditioning for the unconditional row when it is not an encoded text, else None."""
        return None

    def row_cond(self, params: GenerationParams) -> Cond:
        """Per-request conditioning that does not come from text (e.g. SDXL size ids), one row."""
        return {}

    def init_latents(self, params: GenerationParams, generator: torch.Generator, sampler: Sampler) -> torch.Tensor:
        shape = (1, *self.spec.latent_shape(params.height, params.width))
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Every row takes a full step: the denoiser's own forward."""
        return self.loop(latents, timesteps, cond, [RowGroup(0, latents.shape[0], StepKind.FULL, None, 0)])[0]

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                groups: list[RowGroup]) -> tuple[torch.Tensor, list[StepKind]]:
        """One forward over rows whose requests may take different step kinds; returns the
        prediction and the kind each group took."""
        return self.loop(latents, timesteps, cond, groups)

    def cache_bytes(self, policy: CachePolicy, params: GenerationParams) -> int:
        """Bytes the feature cache of one request with ``params`` holds under ``policy``."""
        return 0

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        image = vae.decode(self.vae_input(latents).to(vae.dtype), return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(image, output_type="pil")
        watermark = getattr(self.pipe, "watermark", None)
        if watermark is not None:  # SDXL applies its watermark when the optional package is present
            images = self.pipe.image_processor.postprocess(
                watermark.apply_watermark(image), output_type="pil")
        return images
