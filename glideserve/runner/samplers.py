"""Per-request samplers: one diffusers scheduler instance per request.

diffusers schedulers keep a single step index (and, for multistep solvers, a history
of model outputs), so one instance cannot step batch rows that sit at different
timesteps. Each request gets its own copy of a template configured from the model's
scheduler config; stepping it on the request's slice of the batch reproduces the
pipeline exactly.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler)

log = logging.getLogger(__name__)

# name -> (scheduler class, config overrides)
_UNET_SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "pndm": (PNDMScheduler, {}),
}
_FLOW_SAMPLERS = {"flow_euler": (FlowMatchEulerDiscreteScheduler, {})}


def _registry(flow_matching: bool) -> dict:
    return _FLOW_SAMPLERS if flow_matching else _UNET_SAMPLERS


def sampler_names(flow_matching: bool) -> tuple[str, ...]:
    """Samplers a model can be driven with: flow-matching ones for SD3-style models, the rest for UNets."""
    return tuple(_registry(flow_matching))


def name_of_scheduler(scheduler) -> str | None:
    for registry in (_FLOW_SAMPLERS, _UNET_SAMPLERS):
        for name, (cls, overrides) in registry.items():
            if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
                return name
    return None


@dataclass
class Sampler:
    """A request's own scheduler with its timesteps, position and step kwargs.

    ``scales_input`` mirrors the UNet pipelines, which call ``scale_model_input``
    before the model; ``step_kwargs`` mirrors the pipelines' extra step kwargs
    (``eta`` and the request's ``generator`` where the scheduler takes them).
    """

    scheduler: object
    timesteps: torch.Tensor
    scales_input: bool
    step_kwargs: dict = field(default_factory=dict)
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.index]

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, self.timestep) if self.scales_input else x

    def step(self, model_output: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advance one step: ``(next latents, predicted clean latents or None)``.

        The prediction (x0) feeds previews: schedulers that report it (DDIM, Euler) give
        ``pred_original_sample``; flow matching gives ``x - sigma * v``; others give None.
        """
        sigma = self.scheduler.sigmas[self.index] if self.flow_matching else None
        out = self.scheduler.step(model_output, self.timestep, latents, **self.step_kwargs, return_dict=True)
        self.index += 1
        denoised = getattr(out, "pred_original_sample", None)
        if denoised is None and sigma is not None:
            denoised = latents - sigma.to(latents) * model_output
        return out.prev_sample, denoised

    @property
    def flow_matching(self) -> bool:
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)


class SamplerFactory:
    """Builds per-request samplers for one model; templates are made once per name.

    ``flow_matching`` models (SD3) take the flow samplers, shift their timesteps by the
    image's token count when the scheduler asks for it (``denoiser_config`` gives the
    patch size), and pass no extra step kwargs, as their pipeline does.
    """

    def __init__(self, flow_matching: bool, base_scheduler, device: torch.device, denoiser_config=None):
        self.flow_matching = flow_matching
        self.base_config = base_scheduler.config
        self.device = device
        self.denoiser_config = denoiser_config
        self._templates: dict[str, object] = {}
        self._lengths: dict[tuple, int] = {}

    def _template(self, name: str):
        if name not in self._templates:
            cls, overrides = _registry(self.flow_matching)[name]
            self._templates[name] = cls.from_config(self.base_config, **overrides)
        return self._templates[name]

    def _set_kwargs(self, height: int, width: int, vae_factor: int) -> dict:
        config = self.base_config
        if not self.flow_matching or not config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.denoiser_config.patch_size
        seq_len = (height // vae_factor // patch) * (width // vae_factor // patch)
        return {"mu": calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.16))}

    def create(self, name: str, steps: int, height: int, width: int, vae_factor: int,
               generator: torch.Generator) -> Sampler:
        scheduler = copy.deepcopy(self._template(name))
        scheduler.set_timesteps(steps, device=self.device, **self._set_kwargs(height, width, vae_factor))
        step_params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if not self.flow_matching:  # the SD3 pipeline passes no extra step kwargs
            if "eta" in step_params:
                kwargs["eta"] = 0.0
            if "generator" in step_params:
                kwargs["generator"] = generator
        return Sampler(scheduler, scheduler.timesteps, not self.flow_matching, kwargs)

    def num_iterations(self, name: str, steps: int, height: int, width: int, vae_factor: int) -> int:
        """Model evaluations a request takes (PNDM, e.g., takes steps + 1)."""
        key = (name, steps, height, width)
        if key not in self._lengths:
            scheduler = copy.deepcopy(self._template(name))
            scheduler.set_timesteps(steps, device="cpu", **self._set_kwargs(height, width, vae_factor))
            self._lengths[key] = len(scheduler.timesteps)
        return self._lengths[key]
