"""Engine configuration, resolved and validated once at start-up (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from glideserve.cache.policy import AUTO_CACHE, parse_cache_policy
from glideserve.errors import InvalidRequestError
from glideserve.scheduler.policy import POLICY_NAMES


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budget, queue bound, and the scheduling policy with its deadline rules.

    Budget: ``max_batch_rows`` counts model rows (a request with classifier-free
    guidance takes two); ``max_latent_tokens`` bounds rows x latent tokens per row, so
    large images take more of the budget than small ones. ``max_waiting`` bounds the
    queue: beyond it ``add_request`` raises QueueFullError.

    Policy (see ``glideserve.scheduler.policy``): ``policy`` is ``fcfs``, ``edf`` or
    ``slack``. Under the deadline-aware ones, a request that the latency profile
    predicts to finish later than ``drop_late_after`` x its SLO past its deadline is
    dropped (``None``: never dropped); at most ``max_paused`` requests may be paused by
    preemption at once (0 turns preemption off); a best-effort request that has waited
    ``best_effort_wait_s`` is ordered as if its deadline were then. Admission keeps
    ``admission_margin`` x the SLO in reserve for prediction error: a request is
    admitted only if it is predicted to finish that much before its deadline.

    ``max_bypass_steps`` bounds head-of-line blocking between sizes: a request that
    does not fit the budget lets later (smaller) ones pass for at most this many steps,
    then admission waits for it. ``max_decode_batch`` bounds the images one VAE call
    decodes; while requests wait for capacity, a finished image may wait up to
    ``max_decode_wait_steps`` steps (and never past its deadline) to be decoded with
    others. ``max_prefill_batch`` bounds the prompts one text-encoder call encodes
    (arrivals plus waiting requests encoded ahead of their turn).

    Step caching: ``cache_memory_mb`` is the budget of the per-request feature caches
    (a request whose cache does not fit takes full steps only); ``full_slots`` turns on
    progressive batching: at most that many caching requests take a full step per step,
    and at most ``full_slots`` x interval + 1 requests with a counter policy run at once
    (``None``: every request takes its full steps when its policy says).
    ``min_full_fraction`` is the quality floor of the ``adaptive`` policy: under any
    load, at least this fraction of an adaptive request's steps run every block (it
    takes at most floor(1/f - 1) cached steps in a row; 0.33 allows 2, as
    ``glideserve:2``), and admission counts on it (requests are refused only if even
    that cannot keep them on time).
    """

    max_batch_rows: int = 16
    max_latent_tokens: int = 65536
    max_waiting: int = 256
    policy: str = "slack"
    drop_late_after: float | None = 0.0
    admission_margin: float = 0.15
    max_paused: int = 4
    best_effort_wait_s: float = 60.0
    max_bypass_steps: int = 64
    max_decode_batch: int = 8
    max_decode_wait_steps: int = 4
    max_prefill_batch: int = 16
    cache_memory_mb: float = 1024.0
    full_slots: int | None = None
    min_full_fraction: float = 0.33

    def __post_init__(self):
        for name in ("max_batch_rows", "max_latent_tokens", "max_waiting", "max_bypass_steps", "max_decode_batch",
                     "max_prefill_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_paused", "max_decode_wait_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 0, got {value!r}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if self.drop_late_after is not None and not 0 <= self.drop_late_after <= 100:
            raise ValueError(f"drop_late_after must be in 0..100 (a multiple of the SLO) or None, "
                             f"got {self.drop_late_after!r}")
        if not 0 <= self.admission_margin < 1:
            raise ValueError(f"admission_margin must be in [0, 1), got {self.admission_margin!r}")
        if not 0 <= self.cache_memory_mb <= 1_048_576:
            raise ValueError(f"cache_memory_mb must be in 0..1048576, got {self.cache_memory_mb!r}")
        if self.full_slots is not None and (isinstance(self.full_slots, bool) or not isinstance(self.full_slots, int)
                                            or self.full_slots < 1):
            raise ValueError(f"full_slots must be a positive integer or None, got {self.full_slots!r}")
        if not 0.05 <= self.min_full_fraction <= 1:
            raise ValueError(f"min_full_fraction must be in [0.05, 1], got {self.min_full_fraction!r}")
        if not 0 < self.best_effort_wait_s <= 86_400:
            raise ValueError(f"best_effort_wait_s must be in (0, 86400], got {self.best_effort_wait_s!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to know besides the model.

    ``device``/``dtype`` default to CPU float32 (bf16 is very slow on CPUs without
    AMX). ``max_sequence_length`` is the T5 token budget for SD3 models (None: the
    model folder's serving.json, else diffusers' default 256). ``prompt_cache_size``
    is the number of prompt embeddings kept in the LRU.

    ``profile`` measures the latency profile at load time (a sweep of a few seconds
    per image size in ``profile_sizes``, default the model's default size), reusing
    the JSON cache at ``profile_cache`` when it holds an entry for this model, size,
    dtype, device and thread count (``None``: the user's cache directory). Without it
    the profile starts empty and learns from the first steps.

    ``default_cache`` is the step-caching policy of requests that name none (see
    ``glideserve.cache.policy``); ``auto`` is resolved at load time to the model
    family's own default (``adaptive`` where the family implements it, else ``none``).
    ``latent_aware`` is the latent-aware denoising default. ``lora_dir`` is the only
    place LoRA adapters are read from (None: requests may not name one); at most
    ``max_loras`` adapters, holding at most ``lora_memory_mb`` of low-rank weights, stay
    resident (least recently used evicted first; an adapter larger than the budget is
    refused).

    Execution (see ``glideserve.runner.compiled`` and ``glideserve.runner.precision``):
    ``compile`` compiles the denoiser's repeated blocks with ``torch.compile`` (mode
    ``compile_mode``) at the row counts ``compile_buckets`` (empty: powers of two up to
    ``max_batch_rows``) and the sizes in ``profile_sizes`` (else the model's default size),
    all at load time; ``attention`` picks PyTorch's SDPA kernel (``auto`` lets PyTorch
    choose); ``quantize="fp8"`` stores the denoiser blocks' linear weights in float8
    (weight-only). ``gpu_memory_fraction`` sizes the step's row budget and the caches'
    budget from the device's memory (CUDA only; see ``glideserve.engine.memory_plan``).
    """

    scheduler: SchedulerConfig = SchedulerConfig()
    device: str = "cpu"
    dtype: str = "float32"
    max_sequence_length: int | None = None
    prompt_cache_size: int = 256
    max_image_side: int = 2048
    num_threads: int | None = None
    profile: bool = False
    profile_cache: str | None = None
    profile_sizes: tuple[tuple[int, int], ...] = ()
    default_cache: str = "none"
    latent_aware: bool = False
    lora_dir: str | None = None
    max_loras: int = 16
    lora_memory_mb: float = 512.0
    compile: bool = False
    compile_mode: str = "default"
    compile_buckets: tuple[int, ...] = ()
    attention: str = "auto"
    quantize: str | None = None
    gpu_memory_fraction: float | None = None

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        self._check_execution()
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise ValueError("max_sequence_length must be in 1..512")
        if self.default_cache != AUTO_CACHE:
            try:
                parse_cache_policy(self.default_cache, "default_cache")
            except InvalidRequestError as exc:
                raise ValueError(str(exc)) from None
        for name in ("prompt_cache_size", "max_image_side", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.lora_memory_mb > 0:
            raise ValueError(f"lora_memory_mb must be > 0, got {self.lora_memory_mb!r}")

    def _check_execution(self) -> None:
        from glideserve.runner.compiled import COMPILE_MODES
        from glideserve.runner.precision import ATTENTION_BACKENDS, QUANTIZATIONS

        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode == "reduce-overhead" and not self.device.startswith("cuda"):
            raise ValueError("compile_mode 'reduce-overhead' captures CUDA graphs and needs a CUDA device; "
                             "use 'default' on this device")
        buckets = self.compile_buckets
        if any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.scheduler.max_batch_rows
               for b in buckets):
            raise ValueError(f"compile_buckets must be row counts in 1..max_batch_rows "
                             f"({self.scheduler.max_batch_rows}), got {buckets!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {self.quantize!r}")
        if self.gpu_memory_fraction is not None and not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")

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
