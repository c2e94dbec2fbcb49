"""Precision and kernel choices of the denoiser: SDPA backend, the VAE's safe dtype, fp8 weights.

- **Attention.** diffusers' attention processors call PyTorch's
  ``scaled_dot_product_attention``; ``attention_scope`` restricts it to one kernel
  (``flash``, ``efficient``, ``cudnn`` or ``math``) around the denoiser's forward, and
  ``check_attention`` fails at load time when the device has no such kernel.
- **The VAE's dtype.** SDXL's VAE overflows in float16 (its config says
  ``force_upcast``); diffusers' pipelines upcast it to float32 to decode, and so does
  ``vae_dtype``. bfloat16 has float32's range and needs no upcast.
- **fp8 weight-only quantisation.** :class:`Float8WeightOnlyLinear` keeps a linear
  layer's weight in ``float8_e4m3fn`` with one float scale per output channel and
  dequantises it to the activations' dtype in each forward: weight memory falls 2x
  from bf16 (4x from fp32); the matmul runs in the activations' dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
QUANTIZATIONS = ("fp8",)
FP8 = torch.float8_e4m3fn


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_scope(name: str):
    """A context in which SDPA uses only the ``name`` kernel (``auto``: PyTorch chooses)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_backend(name))


def check_attention(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Raise ValueError, naming the choices, when the ``name`` kernel cannot run here."""
    if name == "auto":
        return
    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    try:
        with attention_scope(name):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        raise ValueError(f"attention {name!r} is not available on {device} in {dtype} (head size {head_dim}): "
                         f"{str(exc).splitlines()[0]}; use --attention auto") from None


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: float32 where float16 would overflow (``force_upcast``), else ``dtype``."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


class Float8WeightOnlyLinear(nn.Linear):
    """``nn.Linear`` whose weight is stored in float8 (e4m3) with a per-output-channel scale.

    Built with :meth:`from_linear`; the forward dequantises the weight to the input's
    dtype and runs the matmul there. It stays an ``nn.Linear`` so LoRA layers wrap it like
    any other linear layer; it is not trainable.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8WeightOnlyLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(FP8).max
        layer.weight = nn.Parameter((weight / scale).to(FP8), requires_grad=False)
        layer.register_buffer("scale", scale.to(linear.weight.dtype))
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def quantize_fp8(blocks: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``blocks`` (the denoiser's repeated blocks: embedders and the
    output projection stay in full precision, as is usual) by :class:`Float8WeightOnlyLinear`; returns
    how many were replaced."""
    replaced = 0
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Float8WeightOnlyLinear.from_linear(child))
                replaced += 1
    return replaced


def check_fp8_device(device: torch.device) -> None:
    """fp8 storage needs Hopper/Ada (compute capability 8.9+) on CUDA; on the CPU it is supported (slowly)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"--quantize fp8 needs a GPU with compute capability 8.9 or newer (Ada, Hopper); "
                             f"this one has {major}.{minor}: serve it in bfloat16 instead")
    elif device.type != "cpu":
        raise ValueError(f"--quantize fp8 runs on CUDA or CPU devices, not {device.type}")
