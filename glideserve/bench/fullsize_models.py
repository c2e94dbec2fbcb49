"""SD3-medium and SDXL-base at their published architecture sizes, with random weights, built offline.

Every component is made from the public diffusers configs of
``stabilityai/stable-diffusion-3-medium-diffusers`` and ``stabilityai/stable-diffusion-xl-base-1.0``
(written out below, so nothing is downloaded); the tokenizers are the repo's offline ones
(:func:`glideserve.models.build.build_clip_tokenizer` / ``build_t5_tokenizer``), whose small vocabularies
index the real embedding tables. Timings depend on shapes, not on weight values, so a random model
benchmarks like the trained one. ``scale="tiny"`` shrinks the same families through the same code.

Weights are created on the target device in the target dtype with every initialiser switched off and then
filled with one cheap uniform draw: building costs one write pass over the weights (T5-XXL alone is 4.76 B
parameters), not transformers' and torch's per-module initialisations, and never a float32 copy.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FAMILIES = ("sd3", "sdxl")
SCALES = ("full", "tiny")
MARKER = "fullsize.json"  # what a built folder holds, so a later run can reuse it

_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)  # ids of the offline tokenizer
CLIP_L = dict(_CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(_CLIP_COMMON, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_VAE_COMMON = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=1024, force_upcast=True)
SD3_MEDIUM = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "text_encoder": CLIP_L, "text_encoder_2": CLIP_BIGG, "text_encoder_3": T5_XXL,
    "vae": dict(_VAE_COMMON, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
}
SDXL_BASE = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 flip_sin_to_cos=True, freq_shift=0),
    "text_encoder": CLIP_L, "text_encoder_2": CLIP_BIGG,
    "vae": dict(_VAE_COMMON, latent_channels=4, scaling_factor=0.13025),
}
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)

# Tiny: the same families and block types, every width and depth cut down (a CPU test runs them in ms).
_TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
_TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
_TINY = {
    "sd3": {"transformer": dict(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
                                pos_embed_max_size=16),
            "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP, "vae": _TINY_VAE,
            "text_encoder_3": dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8)},
    "sdxl": {"unet": dict(sample_size=8, layers_per_block=1, block_out_channels=(16, 32, 64),
                          transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4), cross_attention_dim=32,
                          addition_embed_type_num_heads=4, addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8),
             "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP, "vae": _TINY_VAE},
}


@dataclass(frozen=True)
class ServingSettings:
    """What a request to the built model defaults to: steps, guidance, square image side, T5 length (SD3)."""

    family: str
    scale: str
    steps: int
    guidance: float
    size: int
    max_sequence_length: int | None

    def serving_json(self) -> dict:
        """The ``serving.json`` glideserve reads next to the model (see ``models.loading.serving_defaults``)."""
        data = {"default_steps": self.steps, "default_guidance": self.guidance, "default_size": self.size}
        if self.max_sequence_length is not None:
            data["max_sequence_length"] = self.max_sequence_length
        return data


def settings_for(family: str, scale: str) -> ServingSettings:
    """The published defaults (SD3: 28 steps, guidance 7; SDXL: 30 steps, guidance 5; 1024x1024; T5 256
    tokens), at 64x64 and 32 T5 tokens for ``tiny``."""
    check_family_scale(family, scale)
    tiny = scale == "tiny"
    steps, guidance = (28, 7.0) if family == "sd3" else (30, 5.0)
    length = (32 if tiny else 256) if family == "sd3" else None
    return ServingSettings(family, scale, steps, guidance, 64 if tiny else 1024, length)


def check_family_scale(family: str, scale: str) -> None:
    """Raise ValueError naming the choices when either is unknown."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose sd3 (SD3-medium) or sdxl (SDXL base)")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose full (the published sizes, for a GPU) or tiny (a CPU check)")


def architecture(family: str, scale: str) -> dict[str, dict]:
    """Component name -> constructor config of ``family`` at ``scale`` (a fresh copy, safe to change)."""
    check_family_scale(family, scale)
    base = SD3_MEDIUM if family == "sd3" else SDXL_BASE
    shrink = _TINY[family] if scale == "tiny" else {}
    return {name: {**config, **shrink.get(name, {})} for name, config in base.items()}


@contextlib.contextmanager
def _uninitialised(device: torch.device, dtype: torch.dtype):
    """Modules built inside are allocated on ``device`` in ``dtype`` and left unfilled (no init runs)."""
    from transformers.initialization import no_init_weights  # also switches off torch.nn.init

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def fill_random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """One uniform draw per weight, scaled 1/sqrt(fan_in) so activations stay O(1) through deep stacks (weights
    that overflowed to inf/NaN would make every image NaN and warn at PNG conversion); norm scales 1, biases 0."""
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            bound = 1.0 / math.sqrt(param[0].numel())
            param.uniform_(-bound, bound, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def _construct(name: str, family: str, config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name == "transformer":
        return SD3Transformer2DModel(**config)
    if name == "unet":
        return UNet2DConditionModel(**config)
    if name == "vae":
        return AutoencoderKL(**config)
    if name == "text_encoder_3":
        return T5EncoderModel(T5Config(**config))
    # SDXL's first encoder has no projection head; SD3's both do.
    cls = CLIPTextModel if (family == "sdxl" and name == "text_encoder") else CLIPTextModelWithProjection
    return cls(CLIPTextConfig(**config))


def _empty_module(name: str, family: str, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    with _uninitialised(device, dtype):
        module = _construct(name, family, config)
    if hasattr(module, "all_tied_weights_keys"):
        module.tie_weights()  # transformers ties T5's embed_tokens to `shared` in the init we switched off
    return module


def count_parameters(family: str, scale: str = "full") -> dict[str, int]:
    """Parameters of each component, from shapes alone (built on the meta device: nothing is allocated)."""
    return {name: sum(p.numel() for p in _empty_module(name, family, config, torch.device("meta"),
                                                      torch.bfloat16).parameters())
            for name, config in architecture(family, scale).items()}


def build_pipeline(family: str, scale: str = "full", *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """A ``StableDiffusion3Pipeline`` / ``StableDiffusionXLPipeline`` of ``family`` at ``scale`` with random
    weights on ``device`` in ``dtype`` (eval mode); raises ValueError for an unknown family or scale."""
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline)

    from glideserve.models.build import build_clip_tokenizer, build_t5_tokenizer

    configs = architecture(family, scale)
    generator = torch.Generator(device).manual_seed(seed)
    modules = {}
    for name, config in configs.items():
        module = _empty_module(name, family, config, torch.device(device), dtype)
        fill_random_(module, generator)
        modules[name] = module.to(dtype).eval()  # buffers made in float32 follow the weights
    clip_tokens = {"tokenizer": build_clip_tokenizer(), "tokenizer_2": build_clip_tokenizer()}
    if family == "sd3":
        length = settings_for(family, scale).max_sequence_length
        return StableDiffusion3Pipeline(**modules, **clip_tokens, tokenizer_3=build_t5_tokenizer(length),
                                        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    return StableDiffusionXLPipeline(**modules, **clip_tokens, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each module of the pipeline (the check that the sizes are the published ones)."""
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def _marker(family: str, scale: str, dtype: torch.dtype, seed: int) -> dict:
    return {"family": family, "scale": scale, "dtype": str(dtype).removeprefix("torch."), "seed": seed,
            "architecture": json.loads(json.dumps(architecture(family, scale))),
            "settings": asdict(settings_for(family, scale))}


def save_model(folder: Path, family: str, scale: str = "full", *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0, log=print) -> dict:
    """Build the model and write it to ``folder`` as a diffusers folder (safetensors) with ``serving.json``
    and a marker; returns ``{"parameters": per component, "build_s": seconds}``. ``folder`` is replaced."""
    start = time.perf_counter()
    pipe = build_pipeline(family, scale, device=device, dtype=dtype, seed=seed)
    counts = parameter_counts(pipe)
    log(f"built {family} ({scale}) on {device}: " + ", ".join(f"{n} {c / 1e6:.1f} M" for n, c in counts.items()))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    (folder / "serving.json").write_text(json.dumps(settings_for(family, scale).serving_json(), indent=2) + "\n")
    info = {"parameters": counts, "build_s": round(time.perf_counter() - start, 2)}
    (folder / MARKER).write_text(json.dumps({**_marker(family, scale, dtype, seed), **info}, indent=2) + "\n")
    return info


def ensure_model(folder: Path, family: str, scale: str = "full", *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, rebuild: bool = False, log=print) -> dict:
    """Reuse ``folder`` when its marker says it holds this family, scale, dtype and seed; else build it.
    Returns the marker's ``parameters`` and ``build_s`` plus ``reused``."""
    marker = folder / MARKER
    if not rebuild and marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except ValueError:
            saved = {}
        if all(saved.get(k) == v for k, v in _marker(family, scale, dtype, seed).items()):
            log(f"reusing the model built earlier in {folder} (--rebuild to build it again)")
            return {"parameters": saved["parameters"], "build_s": saved["build_s"], "reused": True}
    return {**save_model(folder, family, scale, device=device, dtype=dtype, seed=seed, log=log), "reused": False}
