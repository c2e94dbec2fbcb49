"""A request queue in front of whole diffusers pipeline calls, behind the engine's interface.

:class:`PipelineBackend` implements the server's backend interface (``spec``,
``start``, ``add_request`` returning a stream of Queued / StepProgress /
GenerationResult / RequestFailed, ``abort``, ``stats``, ``add_step_listener``,
``shutdown``); the baselines in :mod:`glideserve.bench.baselines` only decide which
waiting requests go into the next pipeline call.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from glideserve.engine.async_engine import EngineStats
from glideserve.engine.compute_thread import ComputeThread
from glideserve.engine.core import StepStats
from glideserve.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from glideserve.models.spec import ModelSpec
from glideserve.engine.stream import RequestStream
from glideserve.outputs import GenerationResult, Queued, RequestFailed, RequestTimings, StepProgress
from glideserve.params import GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineConfig:
    """Options of a baseline backend.

    ``max_waiting`` bounds the queue (beyond it: QueueFullError). A batch holds at most
    ``max_batch_size`` requests (default: as many as ``max_batch_rows`` model rows
    allow, counting two rows per request with classifier-free guidance, the engine's
    per-step budget) and waits at most ``batch_wait_ms`` for more to arrive. The
    sequential baseline ignores the batch options. ``max_sequence_length`` is the T5
    token budget of SD3 models.

    ``shed_late`` is the load shedding servers of this kind use: when a request with
    ``slo_ms`` is about to run, and its wait so far plus the predicted duration of a
    pipeline call (an EWMA, weight ``shed_ewma_alpha``, of measured calls with the same
    parameters) exceeds its SLO, it is answered ``deadline_exceeded`` (503) instead of
    run. Nothing is shed before the first call with those parameters was measured.
    """

    device: str = "cpu"
    dtype: str = "float32"
    max_waiting: int = 256
    max_batch_rows: int = 16
    max_batch_size: int | None = None
    batch_wait_ms: float = 50.0
    max_sequence_length: int = 256
    max_image_side: int = 2048
    num_threads: int | None = None
    shed_late: bool = True
    shed_ewma_alpha: float = 0.3

    def __post_init__(self):
        if not 0 < self.shed_ewma_alpha <= 1:
            raise ValueError(f"shed_ewma_alpha must be in (0, 1], got {self.shed_ewma_alpha!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name in ("max_waiting", "max_batch_rows", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "BaselineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown baseline option(s): {', '.join(sorted(unknown))}; "
                            f"accepted: {', '.join(sorted(known))}")
        return cls(**kwargs)


@dataclass(eq=False)
class PendingRequest:
    """An admitted request: its resolved parameters, its stream and when it arrived (monotonic)."""

    request_id: str
    params: GenerationParams
    stream: RequestStream
    arrival: float
    aborted: bool = False
    position: int | None = None

    @property
    def batch_key(self) -> tuple:
        p = self.params
        return (p.num_inference_steps, p.guidance_scale, p.height, p.width, p.sampler, p.negative_prompt is None)

    @property
    def rows(self) -> int:
        return 2 if self.params.uses_cfg else 1


@dataclass
class _BatchProgress:
    start: float
    last: float
    steps: int = 0
    step_times: list[float] = field(default_factory=list)


class PipelineBackend(abc.ABC):
    """A FIFO queue in front of whole ``pipeline(...)`` calls on one worker thread.

    ``add_request`` resolves and validates the parameters against the model and
    enqueues them, raising InvalidRequestError, QueueFullError or EngineStoppedError
    before any event. ``abort`` ends the request's stream at once with
    ``RequestFailed(reason="aborted")``; a running pipeline call is interrupted when
    every request in it was aborted. ``shutdown(drain=True)`` stops admission and
    returns once every admitted request has finished. Subclasses choose the batches.
    """

    system = ""

    def __init__(self, pipe, spec: ModelSpec, config: BaselineConfig, compute: ComputeThread | None = None):
        from glideserve.runner.samplers import SamplerFactory, name_of_scheduler

        self.pipe = pipe
        self.spec = spec
        self.config = config
        self._device = torch.device(config.device)
        denoiser_config = pipe.transformer.config if spec.flow_matching else None
        self._sampler_factory = SamplerFactory(spec.flow_matching, pipe.scheduler, self._device, denoiser_config)
        # The pipeline's own scheduler serves its sampler name, so default requests run exactly the pipeline.
        own = name_of_scheduler(pipe.scheduler)
        self._schedulers = {own: pipe.scheduler} if own is not None else {}
        self._cond = threading.Condition()
        self._waiting: deque[PendingRequest] = deque()
        self._running: dict[str, PendingRequest] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._ids = itertools.count()
        self._compute = compute or ComputeThread(f"glideserve-{self.system}")  # see engine.compute_thread
        self._loop: Future | None = None
        self._accepting = True
        self._stop = False
        self._steps_total = 0
        self._last_step: StepStats | None = None
        self._call_s: dict[tuple, float] = {}  # EWMA of a pipeline call's duration, per batch key
        self._shed_total = 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- the asyncio side ------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is None:
            self._loop = self._compute.submit(self._worker)

    async def add_request(self, params: GenerationParams, request_id: str | None = None) -> RequestStream:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        resolved = params.resolve(self.spec, self.config.max_image_side)
        if resolved.cache != "none":
            raise InvalidRequestError(f"this baseline runs the diffusers pipeline and caches no steps; "
                                      f"omit cache (got {resolved.cache!r}) or use --system glideserve", "cache")
        if resolved.lora:
            raise InvalidRequestError("the baselines serve no LoRA adapters; omit lora or use --system glideserve",
                                      "lora")
        if resolved.latent_aware:
            raise InvalidRequestError("this baseline runs the diffusers pipeline, which has no latent-aware "
                                      "denoising; omit latent_aware or use --system glideserve", "latent_aware")
        rid = request_id or params.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        stream = RequestStream(rid, resolved, asyncio.get_running_loop())
        with self._cond:
            if rid in self._running or any(p.request_id == rid for p in self._waiting):
                raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests); retry shortly")
            self._waiting.append(PendingRequest(rid, resolved, stream, time.monotonic()))
            self._announce_positions()
            self._cond.notify_all()
        return stream

    async def generate(self, params: GenerationParams, request_id: str | None = None):
        stream = await self.add_request(params, request_id)
        async for event in stream:
            yield event

    async def abort(self, request_id: str) -> bool:
        with self._cond:
            pending = next((p for p in self._waiting if p.request_id == request_id), None)
            if pending is not None:
                self._waiting.remove(pending)
                self._announce_positions()
            else:
                pending = self._running.get(request_id)
                if pending is None or pending.aborted:
                    return False
            pending.aborted = True
        pending.stream.push(RequestFailed(request_id, "aborted", "the request was cancelled"))
        return True

    def stats(self) -> EngineStats:
        last = self._last_step
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
        return EngineStats(waiting, running, self._steps_total, last.duration_s if last else 0.0,
                           last.num_rows if last else 0, last.num_requests if last else 0,
                           dropped_total=self._shed_total)

    def model_cards(self) -> list[dict]:
        spec = self.spec
        return [{"name": spec.name, "loaded": True, "loading": False, "family": spec.family,
                 "default_size": f"{spec.default_width}x{spec.default_height}", "default_steps": spec.default_steps}]

    def loras(self, model: str | None = None) -> list[dict]:
        return []  # the baselines serve no adapters

    def add_lora(self, name: str, data: bytes, model: str | None = None) -> dict:
        raise InvalidRequestError("the baselines serve no LoRA adapters", "lora")

    def delete_lora(self, name: str, model: str | None = None) -> None:
        raise InvalidRequestError("the baselines serve no LoRA adapters", "lora")

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    async def shutdown(self, drain: bool = True) -> None:
        self._accepting = False
        if not drain:
            with self._cond:
                ids = [p.request_id for p in self._waiting] + list(self._running)
            for rid in ids:
                await self.abort(rid)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._loop is not None:
            await asyncio.wrap_future(self._loop)
            self._loop = None
        await asyncio.to_thread(self._compute.close)

    # -- the worker thread ---------------------------------------------------------------
    def _announce_positions(self) -> None:
        """Emit Queued for every waiting request whose position changed (caller holds the lock)."""
        for position, pending in enumerate(self._waiting):
            if pending.position != position:
                pending.position = position
                pending.stream.push(Queued(pending.request_id, position))

    @abc.abstractmethod
    def _take_batch(self) -> list[PendingRequest] | None:
        """Remove and return the next batch, blocking until there is one; ``None`` once stopped
        with nothing left. Called with the lock held (``self._cond.wait`` releases it)."""

    def _predicted_late(self, pending: PendingRequest, now: float) -> bool:
        slo_ms = pending.params.slo_ms
        call_s = self._call_s.get(pending.batch_key)
        if not self.config.shed_late or slo_ms is None or call_s is None:
            return False
        return (now - pending.arrival) + call_s > slo_ms / 1000.0

    def _shed(self, pending: PendingRequest, now: float) -> None:
        """Answer a request that cannot finish in time instead of running it (caller holds the lock)."""
        self._shed_total += 1
        predicted = now - pending.arrival + self._call_s[pending.batch_key]
        pending.stream.push(RequestFailed(
            pending.request_id, "deadline_exceeded",
            f"shed: predicted latency {predicted:.2f} s exceeds the SLO of {pending.params.slo_ms / 1000:.2f} s"))

    def _take_timely_batch(self) -> list[PendingRequest] | None:
        """``_take_batch`` without the requests that would finish past their SLO (caller holds the lock)."""
        while True:
            now = time.monotonic()
            for pending in [p for p in self._waiting if self._predicted_late(p, now)]:
                self._waiting.remove(pending)
                self._shed(pending, now)
            batch = self._take_batch()
            if batch is None:
                return None
            now = time.monotonic()
            timely = []
            for pending in batch:
                if self._predicted_late(pending, now):
                    self._shed(pending, now)
                else:
                    timely.append(pending)
            if timely:
                return timely

    def _worker(self) -> None:
        while True:
            with self._cond:
                batch = self._take_timely_batch()
                if batch is None:
                    return
                for pending in batch:
                    self._running[pending.request_id] = pending
                self._announce_positions()
            try:
                self._run_batch(batch)
            except Exception as exc:  # a failing call must not leave callers waiting forever
                log.exception("%s: pipeline call failed", self.system)
                for pending in batch:
                    if not pending.aborted:
                        pending.stream.push(RequestFailed(pending.request_id, "error", f"generation failed: {exc}"))
            finally:
                with self._cond:
                    for pending in batch:
                        self._running.pop(pending.request_id, None)

    def _scheduler_for(self, params: GenerationParams):
        if params.sampler not in self._schedulers:
            sampler = self._sampler_factory.create(params.sampler, params.num_inference_steps, params.height,
                                                   params.width, self.spec.vae_scale_factor,
                                                   torch.Generator("cpu"))
            self._schedulers[params.sampler] = sampler.scheduler
        return self._schedulers[params.sampler]

    def _run_batch(self, batch: list[PendingRequest]) -> None:
        first = batch[0].params
        pipe = self.pipe
        pipe.scheduler = self._scheduler_for(first)
        progress = _BatchProgress(start=time.monotonic(), last=time.monotonic())
        rows = sum(p.rows for p in batch)

        def on_step_end(pipeline, step_index, timestep, callback_kwargs):
            now = time.monotonic()
            progress.step_times.append(now - progress.last)
            progress.last, progress.steps = now, progress.steps + 1
            total = pipeline.num_timesteps
            for row, pending in enumerate(batch):
                if not pending.aborted:
                    preview = None
                    if step_index + 1 in pending.params.preview_steps(total):
                        preview = self._preview(callback_kwargs["latents"][row:row + 1])
                    pending.stream.push(StepProgress(pending.request_id, step_index + 1, total, preview))
            if all(p.aborted for p in batch):
                pipeline._interrupt = True  # diffusers skips the remaining steps
            self._record_step(progress.step_times[-1], len(batch), rows)
            return callback_kwargs

        negatives = None if first.negative_prompt is None else [p.params.negative_prompt for p in batch]
        kwargs = dict(
            prompt=[p.params.prompt for p in batch], negative_prompt=negatives,
            num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
            height=first.height, width=first.width, output_type="pil",
            generator=[torch.Generator("cpu").manual_seed(p.params.seed) for p in batch],
            callback_on_step_end=on_step_end,
        )
        if self.spec.family == "sd3":
            kwargs["max_sequence_length"] = self.config.max_sequence_length
        with torch.inference_mode():
            images = pipe(**kwargs).images
        end = time.monotonic()
        if not all(p.aborted for p in batch):  # an interrupted call says nothing about a full one
            key, alpha = batch[0].batch_key, self.config.shed_ewma_alpha
            previous, duration = self._call_s.get(key), end - progress.start
            self._call_s[key] = duration if previous is None else (1 - alpha) * previous + alpha * duration
        for pending, image in zip(batch, images):
            if pending.aborted:
                continue
            timings = RequestTimings(queued_s=progress.start - pending.arrival, denoise_s=progress.last - progress.start,
                                     decode_s=end - progress.last, total_s=end - pending.arrival,
                                     steps=progress.steps)
            pending.stream.push(GenerationResult(pending.request_id, image, pending.params, timings))

    def _preview(self, latents: torch.Tensor):
        """Half-resolution image of intermediate latents, decoded the way the pipeline decodes."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor
        if self.spec.family == "sd3":
            latents = latents + vae.config.shift_factor
        with torch.inference_mode():
            decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        return image.resize((max(1, image.width // 2), max(1, image.height // 2)))

    def _record_step(self, duration_s: float, num_requests: int, num_rows: int) -> None:
        with self._cond:
            waiting = len(self._waiting)
            running = len(self._running)
        self._steps_total += 1
        self._last_step = StepStats(duration_s, num_requests, num_rows, 0, waiting, running)
        for listener in self._listeners:
            try:
                listener(self._last_step)
            except Exception:
                log.exception("step listener failed")
