"""EngineCore: one step = schedule, execute, update. Not thread-safe by itself."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from glideserve.cache.policy import AUTO_CACHE, parse_cache_policy
from glideserve.config import EngineConfig
from glideserve.errors import InvalidRequestError, ModelLoadError
from glideserve.engine.execution import plan_budgets, prepare_denoiser, warm_up_compiled
from glideserve.engine.memory_plan import DeviceMemory
from glideserve.engine.profiling import load_or_measure, profiling_progress
from glideserve.engine.startup import StartupProgress
from glideserve.models.loading import load_pipeline, pipeline_weight_bytes, serving_defaults, spec_from_pipeline
from glideserve.models.spec import ModelSpec
from glideserve.outputs import EngineEvent
from glideserve.params import GenerationParams
from glideserve.request import Request
from glideserve.runner.families.registry import family_class
from glideserve.runner.runner import ModelRunner
from glideserve.runner.samplers import SamplerFactory
from glideserve.scheduler.output import StageTiming
from glideserve.scheduler.profile import LatencyProfile
from glideserve.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one engine step did, for metrics and benchmarks (seconds).

    ``num_decoded`` images were decoded; ``num_preempted`` requests were paused and
    ``num_resumed`` resumed at this step; ``timing`` is the runner's per-stage timing;
    ``model`` the name of the model that ran it.
    """

    duration_s: float
    num_requests: int
    num_rows: int
    num_new: int
    num_waiting: int
    num_running: int
    num_decoded: int = 0
    num_preempted: int = 0
    num_resumed: int = 0
    timing: StageTiming = field(default_factory=StageTiming)
    model: str = ""


class EngineCore:
    """Couples a Scheduler and a ModelRunner; admits requests and runs steps.

    ``add_request`` validates parameters against the model and enqueues (raising
    GlideServeError subclasses for bad input or a full queue); ``step`` runs one
    iteration and returns the events it produced.
    """

    def __init__(self, runner: ModelRunner, spec: ModelSpec, config: EngineConfig,
                 profile: LatencyProfile | None = None):
        self.runner = runner
        self.spec = spec
        self.config = config
        self._check_defaults()
        self.scheduler = Scheduler(config.scheduler, profile=profile)
        self.last_step: StepStats | None = None
        self.steps_total = 0
        self._ids = itertools.count()
        # The previous step's start and output while work remained, so the next step can
        # measure the whole cycle: time between busy steps (the caller's event delivery, a
        # busy process, the GIL) delays deadlines as much as the stages do.
        self._busy_cycle: tuple[float, object] | None = None

    @classmethod
    def from_pretrained(cls, model: str, config: EngineConfig, *, single_file_config: str | None = None,
                        allow_unsafe_pickle: bool = False, latency_profile: LatencyProfile | None = None,
                        name: str | None = None, device_memory: DeviceMemory | None = None,
                        startup: StartupProgress | None = None) -> "EngineCore":
        """Load ``model`` (served as ``name``, by default ``model`` itself); its latency profile is
        ``latency_profile`` when given (a model loaded again keeps the one it had), else cached or measured
        as ``config`` says. Execution (``glideserve.engine.execution``): quantise, size the memory budgets
        on ``device_memory`` (default: the device's own), compile, then profile. ``startup`` (if given)
        follows the stages."""
        if startup is not None:
            startup.begin("loading", name or str(model))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        defaults = serving_defaults(model)
        if config.max_sequence_length is None:
            config = dataclasses.replace(config, max_sequence_length=int(defaults.get("max_sequence_length", 256)))
        pipe = load_pipeline(model, torch_dtype=config.torch_dtype, single_file_config=single_file_config,
                             allow_unsafe_pickle=allow_unsafe_pickle)
        device = torch.device(config.device)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        spec = spec_from_pipeline(pipe, name=name or str(model), defaults=defaults)
        family_cls = family_class(spec.family)
        if config.default_cache == AUTO_CACHE:
            config = dataclasses.replace(config, default_cache=family_cls.default_cache)
            log.info("step caching by default: %s (the %s family's default; --cache none for exact images)",
                     config.default_cache, spec.family)
        family = family_cls.create(pipe, spec, device, config.torch_dtype, config.max_sequence_length)
        prepare_denoiser(family, config)
        config, _ = plan_budgets(family, spec, config, device_memory)
        denoiser_config = family_cls.denoiser_of(pipe).config
        samplers = SamplerFactory(spec.flow_matching, pipe.scheduler, device, denoiser_config)
        runner = ModelRunner(family, samplers, config)
        if runner.compiled is not None:
            warm_up_compiled(runner, spec, config, startup)
        profile = latency_profile
        if profile is None and config.profile:
            profile = load_or_measure(model, runner, spec, config, progress=profiling_progress(spec.name, startup))
        return cls(runner, spec, config, profile)

    @classmethod
    def load(cls, model: str, *, config: EngineConfig | None = None, single_file_config: str | None = None,
             allow_unsafe_pickle: bool = False, latency_profile: LatencyProfile | None = None,
             name: str | None = None, **options) -> "EngineCore":
        """``from_pretrained`` with either an EngineConfig or its fields as keyword options."""
        if config is not None and options:
            raise TypeError("pass either config=EngineConfig(...) or keyword options, not both")
        return cls.from_pretrained(model, config or EngineConfig.from_kwargs(**options),
                                   single_file_config=single_file_config, allow_unsafe_pickle=allow_unsafe_pickle,
                                   latency_profile=latency_profile, name=name)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (every component of the pipeline)."""
        return pipeline_weight_bytes(self.runner.family.pipe)

    def _check_defaults(self) -> None:
        """Fail at start-up, not on every request, when the server's defaults do not fit the model."""
        try:
            GenerationParams("x").resolve(self.spec, self.config.max_image_side, self.config.default_cache,
                                          self.config.latent_aware)
        except InvalidRequestError as exc:
            raise ValueError(f"the server default for {exc.param} does not fit {self.spec.name}: {exc.message}") \
                from None

    def _check_loras(self, params: GenerationParams) -> None:
        """Read (or find resident) every adapter a request names, so a bad one fails it at admission."""
        if not params.lora:
            return
        if self.runner.loras is None:
            raise InvalidRequestError("this server serves no LoRA adapters (start it with --lora-dir DIR)", "lora")
        for name, _ in params.lora:
            self.runner.loras.get(name)

    def add_request(self, params: GenerationParams, request_id: str | None = None,
                    arrival_time: float | None = None) -> Request:
        if params.model is not None and params.model != self.spec.name:
            raise ModelLoadError(f"model {params.model!r} is not served by this engine; it serves {self.spec.name!r}",
                                 "model")
        resolved = params.resolve(self.spec, self.config.max_image_side, self.config.default_cache,
                                   self.config.latent_aware)
        policy = parse_cache_policy(resolved.cache)
        self._check_loras(resolved)
        rid = request_id or params.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        num_steps = self.runner.samplers.num_iterations(
            resolved.sampler, resolved.num_inference_steps, resolved.height, resolved.width,
            self.spec.vae_scale_factor)
        request = Request(
            rid, resolved, num_steps=num_steps, rows=2 if resolved.uses_cfg else 1,
            tokens_per_row=self.spec.tokens_per_row(resolved.height, resolved.width),
            arrival_time=self.scheduler.clock() if arrival_time is None else arrival_time,
            cache_policy=policy, cache_bytes=self.runner.family.cache_bytes(policy, resolved))
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def step(self, lock: AbstractContextManager = nullcontext()) -> list[EngineEvent]:
        """Run one iteration. ``lock`` guards scheduler state against concurrent add/abort
        while the model runs outside it."""
        start = time.perf_counter()
        with lock:
            if self._busy_cycle is not None:
                previous_start, previous_result = self._busy_cycle
                self.scheduler.observe_step(start - previous_start, previous_result)
            plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        with lock:
            events = self.scheduler.update(plan, result)
            self._record(plan, result, time.perf_counter() - start)
            self._busy_cycle = (start, result) if self.has_unfinished() else None
        return events

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def offload(self) -> None:
        """Move the idle model's weights to host memory; ``restore`` brings them back to its device."""
        self.runner.offload()

    def restore(self) -> None:
        self.runner.restore()

    def exclude_from_cycle(self, seconds: float) -> None:
        """Leave ``seconds`` of other work (another model's step, a fine-tuning micro-step) out of the
        overhead the profile learns from the interval between two steps."""
        if self._busy_cycle is not None:
            start, result = self._busy_cycle
            self._busy_cycle = (start + seconds, result)

    def _record(self, plan, result, duration: float) -> None:
        self.steps_total += 1
        self.last_step = StepStats(duration, len(plan.scheduled), plan.num_rows, len(plan.new_requests),
                                   self.scheduler.num_waiting, self.scheduler.num_running, len(result.finished),
                                   len(plan.preempted), len(plan.resumed), result.timing, self.spec.name)
