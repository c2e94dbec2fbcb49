"""Build small, randomly initialised diffusers pipelines entirely offline.

Every component is made from a config (no hub access): CLIP and T5 tokenizers are
trained here with the `tokenizers` library in the layouts those models expect, so
the result saves with ``save_pretrained`` and loads back with ``from_pretrained``
exactly like a real checkpoint. Tests use the tiny presets; the bundled toy models
use the same builders with larger dimensions.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

# A small vocabulary that covers the toy captions and common prompt words; any other
# word still tokenizes, character by character, because every printable character is
# in the initial alphabet.
_CORPUS_WORDS = (
    "a an the of on in with and photo picture painting drawing of by at from to "
    "red green blue yellow white black orange purple pink brown gray grey "
    "circle square triangle shape background plain small large big "
    "cat dog horse astronaut moon city mountain lake river tree forest flower sky sun "
    "portrait landscape detailed high quality art style digital oil watercolor"
).split()


def _bpe_vocab_and_merges(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout BPE built by construction (no trainer, so every build is identical).

    The vocabulary holds the special tokens, every character with and without the
    ``</w>`` end-of-word suffix, and the left-to-right merges that spell each corpus word.
    """
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # Extra words come after the corpus, so the corpus keeps its ids and merges.
    for word in [*sorted(set(_CORPUS_WORDS)), *sorted(set(extra_words) - set(_CORPUS_WORDS))]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in seen:
                seen.add((current, piece))
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def build_clip_tokenizer(max_length: int = 77, extra_words: tuple[str, ...] = ()):
    """A CLIPTokenizer in CLIP's BPE layout (``</w>`` word suffix), built offline and deterministically;
    ``extra_words`` become single tokens too, after the built-in ones."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_and_merges(extra_words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(max_length: int = 256, extra_words: tuple[str, ...] = ()):
    """A T5 tokenizer from a Unigram vocabulary in T5's layout (pad=0, eos=1, unk=2); ``extra_words``
    are whole pieces too, after the built-in ones."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += ["\u2581" + w for w in dict.fromkeys(_CORPUS_WORDS)]
    pieces += list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    pieces += ["\u2581" + w for w in dict.fromkeys(extra_words) if w not in _CORPUS_WORDS]
    vocab = [(p, 0.0 if i < 3 else -float(i) / 100.0) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_config(hidden: int, layers: int, projection: int, vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
        intermediate_size=hidden * 2, num_attention_heads=max(1, hidden // 16) if hidden >= 16 else 1,
        num_hidden_layers=layers, vocab_size=vocab_size, projection_dim=projection,
        hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=77,
    )


def _vae(block_out_channels: tuple[int, ...], latent_channels: int, sample_size: int, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        layers_per_block=1, norm_num_groups=min(4, block_out_channels[0]), sample_size=sample_size,
        **kwargs,
    )


def _eval_all(components: dict) -> dict:
    # Freshly built modules are in train mode (T5 dropout is 0.1): inference needs eval().
    for value in components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    return components


@dataclass(frozen=True)
class SD3Dims:
    """Sizes of a small SD3 (MMDiT) pipeline; the latent factor is 2**(len(vae_channels)-1)."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    clip_hidden: int = 16
    clip_layers: int = 2
    clip_projection: int = 16
    t5_dim: int = 32
    t5_layers: int = 1
    vae_channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4
    patch_size: int = 2
    image_size: int = 32
    use_t5: bool = True
    t5_max_length: int = 256
    extra_words: tuple[str, ...] = ()  # whole-word tokens beyond the built-in corpus


def build_sd3_components(dims: SD3Dims = SD3Dims(), seed: int = 0) -> dict:
    """Components of a ``StableDiffusion3Pipeline`` (randomly initialised, eval mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if dims.t5_dim < 2 * dims.clip_hidden:
        raise ValueError("t5_dim must be >= 2 * clip_hidden: the two CLIP outputs are padded up to it")
    torch.manual_seed(seed)
    vae_factor = 2 ** (len(dims.vae_channels) - 1)
    tokenizer = build_clip_tokenizer(extra_words=dims.extra_words)
    vocab = len(tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=dims.image_size // vae_factor, patch_size=dims.patch_size,
        in_channels=dims.latent_channels, out_channels=dims.latent_channels,
        num_layers=dims.layers, attention_head_dim=dims.head_dim, num_attention_heads=dims.heads,
        joint_attention_dim=dims.t5_dim, caption_projection_dim=dims.heads * dims.head_dim,
        pooled_projection_dim=2 * dims.clip_projection, pos_embed_max_size=64,
    )
    text_encoder = CLIPTextModelWithProjection(_clip_config(dims.clip_hidden, dims.clip_layers, dims.clip_projection, vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(dims.clip_hidden, dims.clip_layers, dims.clip_projection, vocab))
    text_encoder_3 = tokenizer_3 = None
    if dims.use_t5:
        tokenizer_3 = build_t5_tokenizer(dims.t5_max_length, dims.extra_words)
        t5_config = T5Config(
            vocab_size=len(tokenizer_3), d_model=dims.t5_dim, d_kv=max(8, dims.t5_dim // 4),
            d_ff=dims.t5_dim * 2, num_layers=dims.t5_layers, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
        text_encoder_3 = T5EncoderModel(t5_config)
    vae = _vae(dims.vae_channels, dims.latent_channels, dims.image_size,
               use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return _eval_all({
        "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2, "tokenizer_2": build_clip_tokenizer(extra_words=dims.extra_words),
        "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3,
    })


def build_sd3_pipeline(dims: SD3Dims = SD3Dims(), seed: int = 0):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**build_sd3_components(dims, seed))


@dataclass(frozen=True)
class UNetDims:
    """Sizes of a small SD1.5-style (``xl=False``) or SDXL-style (``xl=True``) UNet pipeline."""

    channels: tuple[int, ...] = (8, 16)
    clip_hidden: int = 16
    clip_layers: int = 2
    clip_projection: int = 16
    vae_channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4
    image_size: int = 32
    xl: bool = False
    time_embed_dim: int = 8


def build_unet_pipeline(dims: UNetDims = UNetDims(), seed: int = 0):
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline`` when ``dims.xl``)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae_factor = 2 ** (len(dims.vae_channels) - 1)
    tokenizer = build_clip_tokenizer()
    vocab = len(tokenizer)
    unet_kwargs = dict(
        block_out_channels=dims.channels, layers_per_block=1, sample_size=dims.image_size // vae_factor,
        in_channels=dims.latent_channels, out_channels=dims.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(dims.channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(dims.channels) - 1) + ("UpBlock2D",),
        norm_num_groups=min(4, dims.channels[0]), attention_head_dim=2,
    )
    vae = _vae(dims.vae_channels, dims.latent_channels, dims.image_size, scaling_factor=0.18215)
    sd_sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    text_encoder = CLIPTextModel(_clip_config(dims.clip_hidden, dims.clip_layers, dims.clip_projection, vocab))
    if not dims.xl:
        unet = UNet2DConditionModel(cross_attention_dim=dims.clip_hidden, **unet_kwargs)
        components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                      "scheduler": DDIMScheduler(**sd_sched), "safety_checker": None,
                      "feature_extractor": None, "image_encoder": None}
        return StableDiffusionPipeline(**_eval_all(components), requires_safety_checker=False)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(dims.clip_hidden, dims.clip_layers, dims.clip_projection, vocab))
    unet = UNet2DConditionModel(
        cross_attention_dim=2 * dims.clip_hidden, addition_embed_type="text_time",
        addition_time_embed_dim=dims.time_embed_dim,
        projection_class_embeddings_input_dim=6 * dims.time_embed_dim + dims.clip_projection,
        transformer_layers_per_block=1, **unet_kwargs,
    )
    sd_sched.pop("set_alpha_to_one"), sd_sched.pop("clip_sample")
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                  "text_encoder_2": text_encoder_2, "tokenizer_2": build_clip_tokenizer(),
                  "scheduler": EulerDiscreteScheduler(**sd_sched), "image_encoder": None,
                  "feature_extractor": None}
    return StableDiffusionXLPipeline(**_eval_all(components))
