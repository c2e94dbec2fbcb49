"""LoRA files: diffusers/peft and kohya/civitai safetensors read into validated per-layer pairs.

``read_lora_file`` is the one way an adapter enters the engine: it checks every key,
shape and target layer before any tensor reaches a model, and raises
InvalidRequestError (a 4xx at the API) with what is wrong, never a crash mid-step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glideserve.errors import InvalidRequestError

# Text encoders whose LoRA layers are served (CLIP attention and MLP projections), per diffusers' key prefix.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# Linear layers a served LoRA may target: those that run only when a row computes its blocks in full.
TARGETABLE_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")


@dataclass(eq=False)
class LoraAdapter:
    """One adapter: per module path (inside the denoiser) its low-rank pair and scaling (alpha / r);
    ``text_layers`` the same per text encoder (``text_encoder``, ``text_encoder_2``)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    text_layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter((self.layers or next(iter(self.text_layers.values()))).values()))[0].shape[0]

    def table(self, component: str | None) -> dict:
        """The layers for the denoiser (``None``) or for one text encoder."""
        return self.layers if component is None else self.text_layers.get(component, {})

    @property
    def nbytes(self) -> int:
        tables = [self.layers, *self.text_layers.values()]
        return sum(t.numel() * t.element_size() for table in tables for a, b, _ in table.values() for t in (a, b))


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")


def read_lora_file(path: Path, name: str, denoiser_prefix: str, pipeline_class: str, dtype: torch.dtype,
                   device: torch.device) -> LoraAdapter:
    """A LoRA file for the denoiser, validated before use: diffusers/peft keys (``save_lora_weights``),
    or kohya/civitai keys (``lora_unet_*``), converted with diffusers' own converter."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"LoRA {name!r} is not a readable safetensors file: {exc}", "lora") from None
    text_layers = {}
    if any(key.startswith(KOHYA_PREFIXES) for key in tensors):
        pairs, alphas = _from_kohya(tensors, name, denoiser_prefix, pipeline_class)
    else:
        for encoder in TEXT_ENCODERS:
            own = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(encoder + ".")]}
            if own:
                encoder_pairs = _from_peft(own, name, encoder)
                text_layers[encoder] = _layers(name, encoder_pairs, _uniform(metadata, encoder, encoder_pairs),
                                               device, dtype, TEXT_SUFFIXES)
        pairs = _from_peft(tensors, name, denoiser_prefix) if tensors else {}
        alphas = _uniform(metadata, denoiser_prefix, pairs)
    if not pairs and not text_layers:
        raise InvalidRequestError(f"LoRA {name!r} holds no {denoiser_prefix} or text-encoder weights", "lora")
    return LoraAdapter(name, _layers(name, pairs, alphas, device, dtype, TARGETABLE_SUFFIXES), text_layers)


def _uniform(metadata: dict, prefix: str, modules) -> dict[str, float]:
    alpha = _metadata_alpha(metadata, prefix)
    return {} if alpha is None else {module: alpha for module in modules}


def _layers(name: str, pairs: dict, alphas: dict, device, dtype, suffixes) -> dict:
    layers = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise InvalidRequestError(f"LoRA {name!r}: {module} lacks its lora_A or lora_B weight", "lora")
        if not module.endswith(suffixes):
            raise InvalidRequestError(f"LoRA {name!r} targets {module}, which per-row LoRA does not serve "
                                      f"(attention and feed-forward projections only)", "lora")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidRequestError(f"LoRA {name!r}: {module} has mismatched shapes {tuple(a.shape)} and "
                                      f"{tuple(b.shape)}", "lora")
        rank = a.shape[0]
        # Without an alpha diffusers loads alpha = r: a scaling of 1.
        scaling = alphas.get(module, float(rank)) / rank
        layers[module] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scaling)
    return layers


def _from_peft(tensors: dict, name: str, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + ".") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise InvalidRequestError(
                f"LoRA {name!r} has the key {key!r}: only denoiser and text-encoder LoRAs for this model, in "
                "diffusers/peft or kohya format, are served", "lora")
        module, _, which = key[len(prefix) + 1:].rpartition(".lora_")
        pairs.setdefault(module, {})[which[0]] = value
    return pairs


def _from_kohya(tensors: dict, name: str, prefix: str, pipeline_class: str):
    """kohya/civitai keys through diffusers' converter (the one ``load_lora_weights`` uses), then to peft keys."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    if prefix != "unet":
        raise InvalidRequestError(f"LoRA {name!r} uses kohya key names, served for UNet models only", "lora")
    if any(not key.startswith("lora_unet_") for key in tensors):
        raise InvalidRequestError(f"LoRA {name!r} holds text-encoder weights (lora_te*), which are not served "
                                  "yet", "lora")
    try:
        state, network_alphas = getattr(diffusers, pipeline_class).lora_state_dict(dict(tensors))
        unet = {key[len("unet."):]: value for key, value in state.items() if key.startswith("unet.")}
        peft_state = convert_unet_state_dict_to_peft(unet)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InvalidRequestError(f"LoRA {name!r}: its kohya keys could not be converted: {exc}", "lora") from None
    pairs = _from_peft({f"{prefix}.{key}": value for key, value in peft_state.items()}, name, prefix)
    alphas = {}
    for key, alpha in (network_alphas or {}).items():
        if key.startswith("unet."):
            down = key[len("unet."):].removesuffix(".alpha")
            for converted in convert_unet_state_dict_to_peft({down: torch.zeros(1)}):
                alphas[converted.rpartition(".lora_")[0]] = float(alpha)
    return pairs, alphas


def _metadata_alpha(metadata: dict, prefix: str) -> float | None:
    """``lora_alpha`` from diffusers' adapter metadata, if the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    value = data.get(f"{prefix}.lora_alpha", data.get("lora_alpha"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
