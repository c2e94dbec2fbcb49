"""Architecture of the bundled toy models and how their diffusers folder is assembled.

The one-shape models (small, tiny) share the text encoders, tokenizers and the trained
autoencoder; they differ only in the SD3 transformer. Their text encoders stay randomly
initialised and frozen: fixed deterministic functions of the caption that the transformer
learns to read. glide-base starts from the same random encoders and trains them with its
transformer (``text_lr_scale``): frozen, they do not say which colour belongs to which
shape of a two-object caption (see ``glideserve.toy.train.JointTextTrainer``); glide-turbo
keeps glide-base's. Text sequences are kept short (CLIP is padded to its tokenizer's
``model_max_length``, T5 to ``max_sequence_length`` from ``serving.json``) because
every text token also runs through the joint transformer blocks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glideserve.models.build import SD3Dims, build_clip_tokenizer, build_sd3_components, build_t5_tokenizer
from glideserve.toy import dataset, scenes
from glideserve.toy.vae import LATENT_CHANNELS, VAE_CHANNELS

T5_MAX_LENGTH = 10  # every caption is 8 T5 tokens with EOS
SCENES_T5_MAX_LENGTH = 16  # the longest relation caption is 15 T5 tokens with EOS
SCHEDULER_SHIFT = 3.0
DEFAULT_STEPS = 20
TEXT_DIMS = SD3Dims(clip_hidden=32, clip_layers=1, clip_projection=32, t5_dim=64, t5_layers=1,
                    vae_channels=VAE_CHANNELS, latent_channels=LATENT_CHANNELS, image_size=dataset.IMAGE_SIZE,
                    t5_max_length=T5_MAX_LENGTH)
# The compositional task's text side: the same sizes and seed, its words as whole tokens, longer T5 sequences.
SCENES_TEXT_DIMS = dataclasses.replace(TEXT_DIMS, t5_max_length=SCENES_T5_MAX_LENGTH,
                                       extra_words=scenes.CAPTION_WORDS)
TEXT_SEED = 1234
TASKS = ("shapes", "scenes")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass(frozen=True)
class ToyPreset:
    """Transformer size and training defaults of one bundled model."""

    name: str
    layers: int
    heads: int
    head_dim: int
    batch_size: int
    lr: float
    default_guidance: float
    patch_size: int = 2
    task: str = "shapes"  # what it is trained on: the one-shape task or the compositional scenes
    default_steps: int = DEFAULT_STEPS
    text_lr_scale: float = 0.0  # > 0: the text encoders train too, at this times ``lr``

    @property
    def t5_max_length(self) -> int:
        return SCENES_T5_MAX_LENGTH if self.task == "scenes" else T5_MAX_LENGTH


PRESETS: dict[str, ToyPreset] = {
    "small": ToyPreset("glide-small", layers=6, heads=4, head_dim=32, batch_size=64, lr=1e-3, default_guidance=4.0),
    "tiny": ToyPreset("glide-tiny", layers=3, heads=2, head_dim=32, batch_size=64, lr=1e-3, default_guidance=4.0),
    "base": ToyPreset("glide-base", layers=8, heads=4, head_dim=32, batch_size=64, lr=1e-3, default_guidance=4.0,
                      task="scenes", text_lr_scale=0.3),
    # Distilled from glide-base (glideserve.toy.distill): its architecture, 2 unguided steps.
    "turbo": ToyPreset("glide-turbo", layers=8, heads=4, head_dim=32, batch_size=64, lr=2e-4, default_guidance=1.0,
                       task="scenes", default_steps=2),
}


def preset(size: str) -> ToyPreset:
    if size not in PRESETS:
        raise ValueError(f"unknown toy model size {size!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[size]


def latent_side() -> int:
    return dataset.IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)


def build_transformer(p: ToyPreset, seed: int = 0):
    """An untrained ``SD3Transformer2DModel`` of the preset's size, wired to the shared text encoders."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=latent_side(), patch_size=p.patch_size, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=p.layers, attention_head_dim=p.head_dim,
        num_attention_heads=p.heads, joint_attention_dim=TEXT_DIMS.t5_dim,
        caption_projection_dim=p.heads * p.head_dim, pooled_projection_dim=2 * TEXT_DIMS.clip_projection,
        pos_embed_max_size=latent_side() // p.patch_size * 2, qk_norm="rms_norm",
    )


def task_captions(task: str = "shapes") -> list[str]:
    """Every caption of a task."""
    if task == "shapes":
        return dataset.all_captions()
    if task == "scenes":
        return [c for level in scenes.DIFFICULTIES for c in scenes.captions_of(level)]
    raise ValueError(f"unknown toy task {task!r}; choose one of {', '.join(TASKS)}")


def text_dims(task: str) -> SD3Dims:
    return SCENES_TEXT_DIMS if task == "scenes" else TEXT_DIMS


def clip_max_length(task: str = "shapes") -> int:
    """Tokens of the longest caption (BOS and EOS included): CLIP is padded to exactly this.

    Truncating a caption would drop its EOS token, whose hidden state is CLIP's pooled
    output, so the length must cover every caption of the task.
    """
    tokenizer = build_clip_tokenizer(extra_words=text_dims(task).extra_words)
    return max(len(tokenizer(text).input_ids) for text in task_captions(task))


def build_text_components(task: str = "shapes") -> dict:
    """The frozen text side of a task's toy models: two CLIP encoders, T5 and their tokenizers."""
    dims = text_dims(task)
    components = build_sd3_components(dims, seed=TEXT_SEED)
    text = {key: components[key] for key in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    length = clip_max_length(task)
    text["tokenizer"] = build_clip_tokenizer(max_length=length, extra_words=dims.extra_words)
    text["tokenizer_2"] = build_clip_tokenizer(max_length=length, extra_words=dims.extra_words)
    text["tokenizer_3"] = build_t5_tokenizer(dims.t5_max_length, dims.extra_words)
    for module in (text["text_encoder"], text["text_encoder_2"], text["text_encoder_3"]):
        module.requires_grad_(False).eval()
    return text


def assemble_pipeline(transformer, vae, text: dict):
    """A ``StableDiffusion3Pipeline`` from trained parts (all in eval mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer.eval()
    vae.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT), **text)


def encode_captions(pipe, captions: list[str], max_sequence_length: int = T5_MAX_LENGTH, grad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and pooled embeddings exactly as the SD3 pipeline computes them at serving time
    (``grad``: with gradients to the text encoders, for training them)."""
    embeds, pooled = [], []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(captions), 64):
            chunk = captions[start:start + 64]
            e, _, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                            do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
            embeds.append(e)
            pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def load_text_encoders(folder: Path) -> dict:
    """The (possibly trained) text encoders of a saved toy model folder, frozen."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    classes = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
               "text_encoder_3": T5EncoderModel}
    return {k: cls.from_pretrained(folder / k).requires_grad_(False).eval() for k, cls in classes.items()}


def serving_defaults(p: ToyPreset) -> dict:
    return {"default_steps": p.default_steps, "default_guidance": p.default_guidance,
            "max_sequence_length": p.t5_max_length}


def save_model(pipe, p: ToyPreset, out: Path) -> None:
    """Write the standard diffusers SD3 folder (safetensors only) plus ``serving.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, component in pipe.components.items():
        # A component loaded from a folder (a reused VAE, a teacher's text encoders) remembers that folder's
        # path: keep the build machine's paths out of the shipped configs.
        if hasattr(component, "register_to_config"):  # diffusers
            component.register_to_config(_name_or_path=name)
        elif hasattr(getattr(component, "config", None), "_name_or_path"):  # transformers
            component.config._name_or_path = name
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "serving.json").write_text(json.dumps(serving_defaults(p), indent=2) + "\n")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())
