"""How a loaded model executes: quantisation, attention kernel, memory budgets, compiled blocks.

``prepare_denoiser`` runs once after the pipeline is on its device and before the
runner exists; ``plan_budgets`` sizes the scheduler's memory budgets on the device;
``warm_up_compiled`` compiles the runner's buckets before the latency profile is
measured, so the profile (and admission) sees compiled steps.
"""

from __future__ import annotations

import logging
import time

import torch

from glideserve.config import EngineConfig
from glideserve.engine.memory_plan import DeviceMemory, MemoryPlan, apply_memory_plan, device_memory_for
from glideserve.engine.startup import StartupProgress
from glideserve.models.spec import ModelSpec
from glideserve.params import GenerationParams
from glideserve.runner.families.base import DenoiserFamily
from glideserve.runner.precision import check_attention, check_fp8_device, quantize_fp8

log = logging.getLogger(__name__)


def prepare_denoiser(family: DenoiserFamily, config: EngineConfig) -> None:
    """Quantise the denoiser's blocks if asked and check the attention kernel can run here."""
    denoiser = family.denoiser_of(family.pipe)
    if config.quantize == "fp8":
        check_fp8_device(family.device)
        replaced = sum(quantize_fp8(block) for block in family.repeated_blocks(denoiser))
        log.info("fp8 weight-only: %d linear layers of the denoiser's blocks quantised", replaced)
    head_dim = getattr(denoiser.config, "attention_head_dim", 64)
    head_dim = head_dim if isinstance(head_dim, int) else 64  # UNets may list one per block
    check_attention(config.attention, family.device, family.dtype, head_dim)


def plan_budgets(family: DenoiserFamily, spec: ModelSpec, config: EngineConfig,
                 memory: DeviceMemory | None = None) -> tuple[EngineConfig, MemoryPlan | None]:
    """With ``gpu_memory_fraction``: the config with the measured memory plan's budgets."""
    if config.gpu_memory_fraction is None:
        return config, None
    memory = memory or device_memory_for(family.device)
    params = GenerationParams("memory probe").resolve(spec, config.max_image_side)
    cond = family.encode([""])[0]
    extra = family.row_cond(params)
    shape = spec.latent_shape(params.height, params.width)

    @torch.inference_mode()
    def forward(rows: int):
        latents = torch.zeros((rows, *shape), device=family.device, dtype=family.dtype)
        batch = {name: value.expand(rows, *value.shape[1:]) for name, value in {**cond, **extra}.items()}
        return family.forward(latents, torch.full((rows,), 500.0, device=family.device), batch)

    config, plan = apply_memory_plan(config, memory, forward, spec.tokens_per_row(params.height, params.width),
                                     2 if params.uses_cfg else 1)
    log.info("%s", plan.describe())
    return config, plan


def warm_up_compiled(runner, spec: ModelSpec, config: EngineConfig, startup: StartupProgress | None = None) -> None:
    """Compile the runner's buckets at the profile sizes (else the model's default size), with progress
    in the log and, when given, in ``startup`` (one unit per bucket and size)."""
    sizes = list(config.profile_sizes) or [(spec.default_height, spec.default_width)]
    start = time.perf_counter()
    log.info("compiling %s's blocks: %d row buckets %s x %d image sizes", spec.name, len(runner.compiled.buckets),
             list(runner.compiled.buckets.sizes), len(sizes))
    if startup is not None:
        startup.begin("compiling the blocks of", spec.name, total=len(runner.compiled.buckets) * len(sizes),
                      unit="bucket shapes")

    def progress(done: int, total: int, message: str) -> None:
        log.info("compiled %d/%d: %s", done, total, message)
        if startup is not None:
            startup.advance(done, f"last: {message}")

    stats = runner.warm_up_compiled(sizes, progress)
    log.info("compiled %d graphs in %.1f s", stats.graphs, time.perf_counter() - start)
