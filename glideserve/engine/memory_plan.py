"""The scheduler's memory budgets, sized from the device's memory instead of guessed.

With ``gpu_memory_fraction`` the engine may use that fraction of the device's total
memory. What is allocated once the model is loaded (its weights, and any model loaded
before it) comes off first, then the LoRA budget (``lora_memory_mb``, adapters resident
on the device); the rest holds a step's activations and the requests' feature caches.

Activations are measured, not estimated: two forwards of the denoiser at the default
image size, with 1 and 2 rows, under the device's peak-memory counter. Their difference
is the bytes one row adds (``bytes_per_token`` = that / latent tokens per row); the
1-row peak minus it is a constant (kernel workspaces, the embedders) that every step
pays. The token budget of a step (``max_latent_tokens``, which bounds rows x tokens
for every image size) is then what the activation share holds, at most what was asked
for and what ``max_batch_rows`` rows of the default size need; the feature caches'
budget (``cache_memory_mb``) is what is left, at most what was asked for. Fine-tuning's
optimizer state claims from that same cache ledger when a job runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from glideserve.config import EngineConfig

GIB, MIB = 2**30, 2**20


class DeviceMemory(Protocol):
    """A device's memory, as the planner sees it."""

    def total_bytes(self) -> int: ...

    def allocated_bytes(self) -> int: ...

    def peak_during(self, fn: Callable[[], object]) -> int:
        """Run ``fn``; the peak bytes it allocated above what was allocated before it."""


class CudaMemory:
    """A CUDA device, through PyTorch's caching allocator statistics."""

    def __init__(self, device: torch.device):
        self.device = device

    def total_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak_during(self, fn: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - before)


def device_memory_for(device: torch.device) -> DeviceMemory:
    """The memory of ``device``; only CUDA devices report what planning needs."""
    if device.type != "cuda":
        raise ValueError(f"--gpu-memory-fraction sizes budgets from a CUDA device's memory; this engine runs on "
                         f"{device} (set --max-batch-rows and --cache-memory-mb there instead)")
    return CudaMemory(device)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of the budget and where they go; ``max_latent_tokens``/``cache_bytes`` feed the scheduler."""

    budget_bytes: int
    allocated_bytes: int
    lora_bytes: int
    step_constant_bytes: int
    bytes_per_token: int
    max_latent_tokens: int
    cache_bytes: int

    def describe(self) -> str:
        return (f"memory plan: budget {self.budget_bytes / GIB:.2f} GiB = loaded {self.allocated_bytes / GIB:.2f} "
                f"+ LoRAs {self.lora_bytes / GIB:.2f} + step {self.step_constant_bytes / GIB:.2f} + activations "
                f"{self.max_latent_tokens * self.bytes_per_token / GIB:.2f} ({self.max_latent_tokens} latent tokens "
                f"at {self.bytes_per_token / 1024:.1f} KiB) + feature caches {self.cache_bytes / GIB:.2f}")


def plan_memory(budget_bytes: int, allocated_bytes: int, lora_bytes: int, peak_one_row: int, peak_two_rows: int,
                tokens_per_row: int, rows_per_request: int, requested_tokens: int,
                requested_cache_bytes: int) -> MemoryPlan:
    """Split ``budget_bytes``; raise ValueError, saying what to change, when a request cannot fit."""
    per_row = max(1, peak_two_rows - peak_one_row)
    constant = max(0, peak_one_row - per_row)
    per_token = -(-per_row // tokens_per_row)
    free = budget_bytes - allocated_bytes - lora_bytes - constant
    needed = rows_per_request * tokens_per_row * per_token
    if free < needed:
        raise ValueError(
            f"the memory budget ({budget_bytes / GIB:.2f} GiB) holds the loaded weights "
            f"({allocated_bytes / GIB:.2f} GiB), the LoRA budget ({lora_bytes / GIB:.2f} GiB) and the step's "
            f"workspace ({constant / GIB:.2f} GiB), but not one request's activations ({needed / GIB:.2f} GiB): "
            "raise --gpu-memory-fraction, lower --lora-memory-mb, or serve in bfloat16 / with --quantize fp8")
    tokens = min(requested_tokens, free // per_token)
    cache = max(0, min(requested_cache_bytes, free - tokens * per_token))
    return MemoryPlan(budget_bytes, allocated_bytes, lora_bytes, constant, per_token, tokens, cache)


def apply_memory_plan(config: EngineConfig, memory: DeviceMemory, forward_rows: Callable[[int], object],
                      tokens_per_row: int, rows_per_request: int) -> tuple[EngineConfig, MemoryPlan]:
    """Measure activations with ``forward_rows(n)`` and return ``config`` with the planned budgets."""
    sched = config.scheduler
    one = memory.peak_during(lambda: forward_rows(1))
    two = memory.peak_during(lambda: forward_rows(2))
    # More tokens than max_batch_rows default-size rows would hold memory no step uses.
    wanted_tokens = min(sched.max_latent_tokens, sched.max_batch_rows * tokens_per_row)
    plan = plan_memory(int(config.gpu_memory_fraction * memory.total_bytes()), memory.allocated_bytes(),
                       int(config.lora_memory_mb * MIB) if config.lora_dir else 0, one, two, tokens_per_row,
                       rows_per_request, wanted_tokens, int(sched.cache_memory_mb * MIB))
    scheduler = dataclasses.replace(sched, max_latent_tokens=plan.max_latent_tokens,
                                    cache_memory_mb=plan.cache_bytes / MIB)
    return dataclasses.replace(config, scheduler=scheduler), plan
