"""Write a diffusers pipeline's weights as one file in the original (LDM / Stability) layout.

This is the inverse of the key conversions in diffusers' ``loaders/single_file_utils.py``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_open_clip_checkpoint``, ...),
written for the parts the small test pipelines contain, so that single-file loading can be
checked end to end against the pipeline the file was made from. Every converter fails on
a weight it does not place, so a file never silently lacks a tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


class _Placer:
    """Collects converted tensors and tracks which source keys were placed."""

    def __init__(self, state_dict: dict[str, torch.Tensor], prefix: str):
        self.source = dict(state_dict)
        self.prefix = prefix
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        return self.source.pop(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.out[self.prefix + key] = value

    def done(self, what: str) -> dict[str, torch.Tensor]:
        if self.source:
            raise ValueError(f"{what}: no original-layout name for {sorted(self.source)[:5]}")
        return self.out


def _rename(name: str, table: dict[str, str]) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{table[head]}.{leaf}"


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block + 1
    with_attention = {int(k.split(".")[1]) for k in unet.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)}
    placer = _Placer(unet.state_dict(), "model.diffusion_model.")
    for key in list(placer.source):
        if (m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            b, layer, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per_block + layer}.0.{_rename(rest, _UNET_RESNET)}"
        elif (m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)):
            new = f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
        elif (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)):
            new = f"input_blocks.{1 + int(m[1]) * per_block + per_block - 1}.0.op.{m[2]}"
        elif (m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key)):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
        elif (m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key)):
            new = f"middle_block.1.{m[1]}"
        elif (m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{_rename(m[3], _UNET_RESNET)}"
        elif (m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)):
            new = f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"
        elif (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)):
            b = int(m[1])
            slot = 2 if b in with_attention else 1
            new = f"output_blocks.{b * per_block + per_block - 1}.{slot}.conv.{m[2]}"
        elif key.rpartition(".")[0] in _UNET_TOP:
            new = _rename(key, _UNET_TOP)
        else:
            continue
        placer.put(new, placer.take(key))
    return placer.done("unet")


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    placer = _Placer(vae.state_dict(), "first_stage_model.")
    for key in list(placer.source):
        value = placer.source[key]
        if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif (m := re.fullmatch(r"(encoder|decoder)\.(\w+)\.(\w+)", key)) and m[2] in _VAE_TOP:
            new = f"{m[1]}.{_VAE_TOP[m[2]]}.{m[3]}"
        elif key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            continue
        placer.take(key)
        placer.put(new, value)
    return placer.done("vae")


def hf_clip_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under ``prefix``, with the ``text_model.`` nesting real files have."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[prefix + key] = value
    return out


def open_clip_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second text encoder)."""
    placer = _Placer(text_encoder.state_dict(), prefix)
    placer.put("token_embedding.weight", placer.take("text_model.embeddings.token_embedding.weight"))
    placer.put("positional_embedding", placer.take("text_model.embeddings.position_embedding.weight"))
    placer.put("ln_final.weight", placer.take("text_model.final_layer_norm.weight"))
    placer.put("ln_final.bias", placer.take("text_model.final_layer_norm.bias"))
    placer.put("text_projection", placer.take("text_projection.weight").T.contiguous())
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [placer.take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            placer.put(f"{dst}attn.in_proj_{kind}", torch.cat(qkv))
            for old, new in _OPEN_CLIP_LAYER.items():
                placer.put(f"{dst}{new}.{kind}", placer.take(f"{src}{old}.{kind}"))
    return placer.done("open clip")


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift])


def sd3_transformer_to_original(transformer) -> dict[str, torch.Tensor]:
    placer = _Placer(transformer.state_dict(), "model.diffusion_model.")
    take, put = placer.take, placer.put
    put("pos_embed", take("pos_embed.pos_embed"))
    for kind in ("weight", "bias"):
        put(f"x_embedder.proj.{kind}", take(f"pos_embed.proj.{kind}"))
        put(f"context_embedder.{kind}", take(f"context_embedder.{kind}"))
        for i, j in ((1, 0), (2, 2)):
            put(f"t_embedder.mlp.{j}.{kind}", take(f"time_text_embed.timestep_embedder.linear_{i}.{kind}"))
            put(f"y_embedder.mlp.{j}.{kind}", take(f"time_text_embed.text_embedder.linear_{i}.{kind}"))
        put(f"final_layer.linear.{kind}", take(f"proj_out.{kind}"))
        put(f"final_layer.adaLN_modulation.1.{kind}", _swap_scale_shift(take(f"norm_out.linear.{kind}")))
    last = transformer.config.num_layers - 1
    for i in range(last + 1):
        src, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for kind in ("weight", "bias"):
            put(f"{x}attn.qkv.{kind}", torch.cat([take(f"{src}attn.to_{p}.{kind}") for p in "qkv"]))
            put(f"{c}attn.qkv.{kind}", torch.cat([take(f"{src}attn.add_{p}_proj.{kind}") for p in "qkv"]))
            put(f"{x}attn.proj.{kind}", take(f"{src}attn.to_out.0.{kind}"))
            put(f"{x}adaLN_modulation.1.{kind}", take(f"{src}norm1.linear.{kind}"))
            put(f"{x}mlp.fc1.{kind}", take(f"{src}ff.net.0.proj.{kind}"))
            put(f"{x}mlp.fc2.{kind}", take(f"{src}ff.net.2.{kind}"))
            context_modulation = take(f"{src}norm1_context.linear.{kind}")
            if i == last:  # the last context block only modulates (context_pre_only)
                put(f"{c}adaLN_modulation.1.{kind}", _swap_scale_shift(context_modulation))
                continue
            put(f"{c}adaLN_modulation.1.{kind}", context_modulation)
            put(f"{c}attn.proj.{kind}", take(f"{src}attn.to_add_out.{kind}"))
            put(f"{c}mlp.fc1.{kind}", take(f"{src}ff_context.net.0.proj.{kind}"))
            put(f"{c}mlp.fc2.{kind}", take(f"{src}ff_context.net.2.{kind}"))
    return placer.done("sd3 transformer")


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SD1.5, SDXL or SD3 pipeline under their original-layout names."""
    name = type(pipe).__name__
    if name == "StableDiffusion3Pipeline":
        projection = pipe.text_encoder.text_projection.weight
        if not torch.equal(projection, torch.eye(*projection.shape)):
            # The original SD3 layout stores no CLIP-L projection: loaders assume identity.
            raise ValueError("SD3's first text encoder must have an identity text_projection to be exported")
        out = sd3_transformer_to_original(pipe.transformer)
        out |= hf_clip_to_original(pipe.text_encoder, "text_encoders.clip_l.transformer.")
        out |= hf_clip_to_original(pipe.text_encoder_2, "text_encoders.clip_g.transformer.")
        if pipe.text_encoder_3 is not None:
            out |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in pipe.text_encoder_3.state_dict().items()}
    elif name == "StableDiffusionXLPipeline":
        out = unet_to_original(pipe.unet)
        out |= hf_clip_to_original(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        out |= open_clip_to_original(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    elif name == "StableDiffusionPipeline":
        out = unet_to_original(pipe.unet)
        out |= hf_clip_to_original(pipe.text_encoder, "cond_stage_model.transformer.")
    else:
        raise ValueError(f"no original layout known for {name}")
    return out | vae_to_original(pipe.vae)


def save_original_checkpoint(pipe, path: Path, *, leave_out: tuple[str, ...] = ()) -> Path:
    """Write the pipeline as one safetensors file, without the tensors whose names start with ``leave_out``."""
    tensors = {k: v for k, v in pipeline_to_original(pipe).items() if not k.startswith(leave_out)}
    # Tied weights (T5's shared embedding) share storage, which safetensors refuses.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def _wider_clip(text_encoder, hidden: int, seed: int):
    """A CLIPTextModelWithProjection like ``text_encoder`` but ``hidden`` wide.

    diffusers tells the two CLIP encoders of an SD3 or SDXL file apart by their widths
    (768 and 1280 in the real models), so the small test pipelines need distinct widths too.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "hidden_size": hidden,
                               "intermediate_size": 2 * hidden})
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def build_sd3_for_original_layout(seed: int = 0):
    """The small SD3 pipeline with a 24-wide CLIP-G and an identity CLIP-L projection, as real SD3 has."""
    from diffusers import StableDiffusion3Pipeline
    from glideserve.models.build import SD3Dims, build_sd3_components

    components = build_sd3_components(SD3Dims(t5_dim=48), seed)  # t5_dim >= the two CLIP widths together
    components["text_encoder_2"] = _wider_clip(components["text_encoder_2"], 24, seed + 1)
    with torch.no_grad():
        components["text_encoder"].text_projection.weight.copy_(torch.eye(16))
    return StableDiffusion3Pipeline(**components)


def build_sdxl_for_original_layout(seed: int = 0):
    """The small SDXL pipeline with a 24-wide second text encoder and a UNet sized for it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from glideserve.models.build import UNetDims, build_unet_pipeline

    pipe = build_unet_pipeline(UNetDims(xl=True), seed)
    text_encoder_2 = _wider_clip(pipe.text_encoder_2, 24, seed + 1)
    cross_attention = pipe.text_encoder.config.hidden_size + 24
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": cross_attention}).eval()
    return StableDiffusionXLPipeline(**{**pipe.components, "text_encoder_2": text_encoder_2, "unet": unet})
