"""Engine configuration, resolved and validated once at start-up (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budget and queue bound.

    ``max_batch_rows`` counts model rows (a request with classifier-free guidance
    takes two); ``max_latent_tokens`` bounds rows x latent tokens per row, so large
    images take more of the budget than small ones. ``max_waiting`` bounds the queue:
    beyond it ``add_request`` raises QueueFullError.
    """

    max_batch_rows: int = 16
    max_latent_tokens: int = 65536
    max_waiting: int = 256

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to know besides the model.

    ``device``/``dtype`` default to CPU float32 (bf16 is very slow on CPUs without
    AMX). ``max_sequence_length`` is the T5 token budget for SD3 models (None: the
    model folder's serving.json, else diffusers' default 256). ``prompt_cache_size`` is the number of prompt embeddings kept in the
    LRU. ``max_decode_batch`` bounds how many images one step decodes, so a burst of
    finishing requests cannot stall the next denoising step for long.
    """

    scheduler: SchedulerConfig = SchedulerConfig()
    device: str = "cpu"
    dtype: str = "float32"
    max_sequence_length: int | None = None
    prompt_cache_size: int = 256
    max_decode_batch: int = 8
    max_image_side: int = 2048
    num_threads: int | None = None

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise ValueError("max_sequence_length must be in 1..512")
        for name in ("prompt_cache_size", "max_decode_batch", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments; scheduler fields may be given directly."""
        sched_names = {f.name for f in fields(SchedulerConfig)}
        sched = {k: kwargs.pop(k) for k in list(kwargs) if k in sched_names}
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        if sched:
            kwargs["scheduler"] = SchedulerConfig(**sched)
        return cls(**kwargs)
