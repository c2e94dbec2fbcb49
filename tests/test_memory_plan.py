"""Memory budgets from the device's memory: the plan's arithmetic, and an engine planned on a fake device."""

from __future__ import annotations

import pytest
import torch

from glideserve import GenerationParams
from glideserve.engine.core import EngineCore
from glideserve.engine.memory_plan import GIB, MIB, device_memory_for, plan_memory
from glideserve.errors import InvalidRequestError


def test_plan_gives_activations_their_share_then_caches_the_rest():
    plan = plan_memory(budget_bytes=10 * GIB, allocated_bytes=4 * GIB, lora_bytes=GIB // 2,
                       peak_one_row=GIB, peak_two_rows=3 * GIB // 2, tokens_per_row=4096, rows_per_request=2,
                       requested_tokens=16384, requested_cache_bytes=4 * GIB)
    assert plan.step_constant_bytes == GIB // 2 and plan.bytes_per_token == (GIB // 2) // 4096
    assert plan.max_latent_tokens == 16384  # as asked: 4 rows of 4096 tokens, 2 GiB of activations
    assert plan.cache_bytes == 3 * GIB  # 5 GiB free - 2 GiB of activations (under the 4 GiB asked)
    tight = plan_memory(10 * GIB, 4 * GIB, GIB // 2, GIB, 3 * GIB // 2, 4096, 2, 65536, 4 * GIB)
    assert tight.max_latent_tokens == 5 * GIB // tight.bytes_per_token and tight.cache_bytes == 0
    assert "feature caches 0.00" in tight.describe()


def test_plan_refuses_a_budget_without_room_for_one_request():
    with pytest.raises(ValueError, match="not one request's activations.*raise --gpu-memory-fraction"):
        plan_memory(6 * GIB, 5 * GIB + GIB // 2, 0, GIB // 2, GIB, 4096, 2, 65536, GIB)


def test_memory_fraction_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA device's memory; this engine runs on cpu"):
        device_memory_for(torch.device("cpu"))


class FakeDevice:
    """A device of ``total`` bytes whose forwards peak at ``per_row`` bytes per row plus ``constant``."""

    def __init__(self, total: int, allocated: int, per_row: int, constant: int):
        self.total, self.allocated, self.per_row, self.constant = total, allocated, per_row, constant
        self.rows_seen = []

    def total_bytes(self) -> int:
        return self.total

    def allocated_bytes(self) -> int:
        return self.allocated

    def peak_during(self, fn) -> int:
        out = fn()  # the real forward runs: its output's rows are the rows measured
        self.rows_seen.append(out.shape[0])
        return self.constant + out.shape[0] * self.per_row


def test_engine_budgets_come_from_the_fake_device(tiny_sd3_dir):
    device = FakeDevice(total=200 * MIB, allocated=20 * MIB, per_row=4 * MIB, constant=2 * MIB)
    core = EngineCore.from_pretrained(
        tiny_sd3_dir, _config(gpu_memory_fraction=0.5, cache_memory_mb=64.0, max_batch_rows=8),
        device_memory=device)
    assert device.rows_seen == [1, 2]
    tokens = core.spec.tokens_per_row(core.spec.default_height, core.spec.default_width)
    per_token = -(-4 * MIB // tokens)
    # 100 MiB budget - 20 loaded - 2 step workspace = 78 MiB: 8 default-size rows (32 MiB), caches the rest.
    assert core.scheduler.config.max_latent_tokens == 8 * tokens
    assert core.scheduler.memory.budget_bytes == 78 * MIB - 8 * tokens * per_token
    # A request larger than the planned token budget is refused with a 4xx-class error, not run out of memory.
    with pytest.raises(InvalidRequestError, match="budget"):
        core.add_request(GenerationParams("a cat", height=256, width=256))


def test_engine_refuses_to_start_when_the_weights_fill_the_budget(tiny_sd3_dir):
    device = FakeDevice(total=100 * MIB, allocated=48 * MIB, per_row=4 * MIB, constant=0)
    with pytest.raises(ValueError, match="raise --gpu-memory-fraction"):
        EngineCore.from_pretrained(tiny_sd3_dir, _config(gpu_memory_fraction=0.5), device_memory=device)


def _config(**options):
    from glideserve.config import EngineConfig

    return EngineConfig.from_kwargs(max_sequence_length=16, **options)
