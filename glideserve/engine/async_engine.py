"""AsyncEngine: one engine loop on its own thread, over one or several models, with asyncio streams."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from glideserve.cache.policy import parse_cache_policy
from glideserve.config import EngineConfig
from glideserve.engine.compute_thread import ComputeThread
from glideserve.engine.core import EngineCore, StepStats
from glideserve.engine.model_set import ModelSet, ModelSlot, ModelSource, default_model_name
from glideserve.engine.residency import ModelLoader, ModelResidency, PendingRequest
from glideserve.engine.startup import StartupProgress
from glideserve.engine.stream import RequestStream
from glideserve.errors import (EngineStoppedError, InvalidRequestError, QueueFullError,
                               SLOUnattainableError)
from glideserve.models.spec import ModelSpec
from glideserve.outputs import EngineEvent, GenerationResult, Loading, RequestFailed
from glideserve.params import GenerationParams, resolve_lora
from glideserve.runner.lora import available_adapters
from glideserve.scheduler.profile import LatencyProfile

if TYPE_CHECKING:
    from glideserve.finetune.service import FineTuningService

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for health pages and metrics (all models together).

    The ``*_total`` fields count since start: requests refused at admission because
    they could not meet their deadline, admitted requests dropped for lateness, and
    preemptions and resumes at step boundaries (zero for backends that do none).
    ``num_waiting`` includes requests waiting for their model to load.
    """

    num_waiting: int
    num_running: int
    steps_total: int
    last_step_s: float
    last_batch_rows: int
    last_batch_requests: int
    num_paused: int = 0
    refused_total: int = 0
    dropped_total: int = 0
    preempted_total: int = 0
    resumed_total: int = 0


class AsyncEngine:
    """Runs EngineCore steps of one or several models on one background thread, for asyncio callers.

    The loop runs on ``compute`` (see :mod:`glideserve.engine.compute_thread`), where
    every model is loaded and profiled at start-up. With several models (``from_models``)
    the loop shares steps between them (see :mod:`glideserve.engine.model_set`); a model
    unloaded to keep within the weights budget is loaded again, on a short-lived thread
    so the other models keep stepping, when a request names it.

    ``add_request`` validates and enqueues at once (raising InvalidRequestError,
    ModelLoadError, QueueFullError, SLOUnattainableError or EngineStoppedError before any
    event), and returns a RequestStream of Loading / Queued / StepProgress events ending in
    a GenerationResult or a RequestFailed. ``abort`` frees a request at the next step.
    ``shutdown(drain=True)`` stops admission and returns once every admitted request has
    finished.
    """

    def __init__(self, models: ModelSet, compute: ComputeThread, loader: ModelLoader):
        self.models = models
        self._compute = compute
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._residency = ModelResidency(models, loader, self._lock, self._wake)
        self._streams: dict[str, RequestStream] = {}
        self._owner: dict[str, ModelSlot] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self.fine_tuning = None  # a FineTuningService once attach_fine_tuning is called
        self._loop: Future | None = None
        self._accepting = True
        self._stop = False
        self._steps_total = 0
        self._last_step: StepStats | None = None

    @classmethod
    def from_pretrained(cls, model: str, **options) -> "AsyncEngine":
        """Load a bundled name, diffusers folder or checkpoint; options are EngineConfig fields
        (flat, scheduler ones included), ``config=EngineConfig(...)``, ``single_file_config``
        and ``allow_unsafe_pickle``."""
        return cls.from_models([ModelSource(default_model_name(str(model)), str(model))], **options)

    @classmethod
    def from_models(cls, models: list[str | ModelSource], *, max_loaded_models: int | None = None,
                    weights_memory_gb: float | None = None, offload_memory_gb: float | None = None,
                    config: EngineConfig | None = None,
                    single_file_config: str | None = None, allow_unsafe_pickle: bool = False,
                    startup: StartupProgress | None = None, **options) -> "AsyncEngine":
        """Serve several models (``[NAME=]PATH`` strings or ModelSources; the first is the default)
        under one engine loop and one EngineConfig. Each is loaded and profiled once at start-up;
        those beyond ``max_loaded_models`` or ``weights_memory_gb`` are unloaded again (least
        recently used first, the default model last) and reloaded when requested. With
        ``offload_memory_gb`` unloaded models are kept in that much host memory instead (see
        ModelSet), and come back by a copy rather than a load from disk. ``startup`` follows the
        start-up's loads (a server answers ``/ready`` with it meanwhile)."""
        if config is not None and options:
            raise TypeError("pass either config=EngineConfig(...) or keyword options, not both")
        config = config or EngineConfig.from_kwargs(**options)
        sources = [m if isinstance(m, ModelSource) else ModelSource.parse(m) for m in models]
        budget = None if weights_memory_gb is None else int(weights_memory_gb * 2**30)
        host = None if offload_memory_gb is None else int(offload_memory_gb * 2**30)
        model_set = ModelSet(sources, max_loaded_models, budget, host_budget_bytes=host)

        def load(source: ModelSource, profile: LatencyProfile | None,
                 progress: StartupProgress | None = None) -> EngineCore:
            return EngineCore.from_pretrained(source.path, config, single_file_config=single_file_config,
                                              allow_unsafe_pickle=allow_unsafe_pickle, latency_profile=profile,
                                              name=source.name, startup=progress)

        compute = ComputeThread("glideserve-engine")
        engine = cls(model_set, compute, load)
        try:
            compute.call(engine._load_all, startup)
        except BaseException:
            compute.close()
            raise
        return engine

    def _load_all(self, startup: StartupProgress | None = None) -> None:
        """Start-up, on the compute thread: load (and profile) every model once."""
        self._residency.load_all(startup)
        gc.collect()
        self._residency.take_collect()

    @property
    def core(self) -> EngineCore | None:
        """The default model's EngineCore (None while it is unloaded)."""
        return self.models.default.core

    @property
    def spec(self) -> ModelSpec:
        return self.models.default.spec

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        if self._loop is None:
            self._loop = self._compute.submit(self._run)

    async def add_request(self, params: GenerationParams, request_id: str | None = None) -> RequestStream:
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        slot = self.models.get(params.model)
        core = slot.core
        store = core.runner.loras if core is not None else None
        if store is not None and params.lora:
            # Read adapter files off the event loop and outside the engine lock; admission then finds them resident.
            for name, _ in resolve_lora(params.lora):
                await asyncio.to_thread(store.get, name)
        with self._lock:
            rid = request_id or params.request_id
            if rid is not None and rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
            if slot.core is not None:
                request = slot.core.add_request(params, request_id)
                rid, resolved = request.request_id, request.params
            else:
                rid = request_id or params.request_id or f"req-{uuid.uuid4().hex[:12]}"
                resolved = self._admit_cold(slot, params, rid)
            stream = RequestStream(rid, resolved, loop)
            self._streams[rid] = stream
            self._owner[rid] = slot
            if slot.core is None:
                stream.push(Loading(rid, slot.name, round(slot.load_remaining_s(time.monotonic()), 3)))
        self._wake.set()
        return stream

    def _admit_cold(self, slot: ModelSlot, params: GenerationParams, rid: str) -> GenerationParams:
        """Admit a request for an unloaded model: validated against what the model's first load
        taught (its spec, config and profile), refused if the load would make it late."""
        config = slot.config
        resolved = params.resolve(slot.spec, config.max_image_side, config.default_cache, config.latent_aware)
        parse_cache_policy(resolved.cache)
        if len(slot.pending) >= config.scheduler.max_waiting:
            raise QueueFullError(f"the queue is full ({config.scheduler.max_waiting} requests wait for model "
                                 f"{slot.name} to load); retry shortly")
        now = time.monotonic()
        if resolved.slo_ms is not None and slot.deadline_aware:
            predicted = slot.cold_latency_s(resolved, now)
            if predicted > resolved.slo_ms / 1000 * (1 - config.scheduler.admission_margin):
                self._residency.retired.refused += 1
                raise SLOUnattainableError(
                    f"the request cannot finish within its SLO: model {slot.name} must be loaded first "
                    f"(predicted latency {predicted:.2f} s); retry with a longer slo_ms",
                    predicted_s=predicted, retry_after_s=max(1.0, slot.load_remaining_s(now)))
        slot.pending.append(PendingRequest(resolved, rid, now))
        return resolved

    async def generate(self, params: GenerationParams, request_id: str | None = None) -> AsyncIterator[EngineEvent]:
        stream = await self.add_request(params, request_id)
        async for event in stream:
            yield event

    async def abort(self, request_id: str) -> bool:
        with self._lock:
            found = self._abort(request_id)
        self._wake.set()
        return found

    def _abort(self, request_id: str) -> bool:
        slot = self._owner.get(request_id)
        if slot is None:
            return False
        for pending in slot.pending:
            if pending.request_id == request_id:  # never reached a scheduler: answer it here
                slot.pending.remove(pending)
                self._finish(RequestFailed(request_id, "aborted", "the request was cancelled"))
                return True
        return slot.core is not None and slot.core.abort(request_id)

    def model_cards(self) -> list[dict]:
        """Every configured model: family, default size and steps, and whether it is resident."""
        with self._lock:
            return [slot.describe() for slot in self.models.slots]

    def loras(self, model: str | None = None) -> list[dict]:
        slot = self.models.get(model)
        core = slot.core
        if core is None:  # the files are there; what is resident went with the weights
            directory = slot.config.lora_dir
            return [] if directory is None else [{"name": name, "resident": False}
                                                 for name in available_adapters(directory)]
        return [] if core.runner.loras is None else core.runner.loras.describe()

    def add_lora(self, name: str, data: bytes, model: str | None = None) -> dict:
        return self._lora_store(model).add(name, data)

    def delete_lora(self, name: str, model: str | None = None) -> None:
        self._lora_store(model).delete(name)
        for slot in self.models.loaded():  # the folder is shared: no model may keep serving it
            core = slot.core
            if core is not None and core.runner.loras is not None:
                core.runner.loras.forget(name)

    def _lora_store(self, model: str | None):
        slot = self.models.get(model)
        core = slot.core  # read once: the loop may unload the model meanwhile
        if core is None:
            raise InvalidRequestError(f"model {slot.name} is not loaded now, and an upload is checked against "
                                      "its weights; generate with it first (it then loads)", "model")
        if core.runner.loras is None:
            raise InvalidRequestError("this server serves no LoRA adapters (start it with --lora-dir DIR)", "lora")
        return core.runner.loras

    def stats(self) -> EngineStats:
        with self._lock:
            cores = [slot.core for slot in self.models.loaded()]
            counters = [self._residency.retired, *(core.scheduler.counters for core in cores)]
            last = self._last_step
            return EngineStats(
                sum(c.scheduler.num_waiting for c in cores) + sum(len(s.pending) for s in self.models.slots),
                sum(c.scheduler.num_running for c in cores), self._steps_total,
                last.duration_s if last else 0.0, last.num_rows if last else 0, last.num_requests if last else 0,
                num_paused=sum(c.scheduler.num_paused for c in cores),
                refused_total=sum(c.refused for c in counters), dropped_total=sum(c.dropped for c in counters),
                preempted_total=sum(c.preempted for c in counters), resumed_total=sum(c.resumed for c in counters))

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    def attach_fine_tuning(self, data_dir: str) -> "FineTuningService":
        """Serve fine-tuning jobs on datasets under ``data_dir``: the loop runs their micro-steps when no
        request's deadline needs the time (see glideserve.finetune.service)."""
        from glideserve.finetune.service import FineTuningService

        self.fine_tuning = FineTuningService.for_models(data_dir, self.models)
        return self.fine_tuning

    async def shutdown(self, drain: bool = True) -> None:
        self._accepting = False
        if not drain:
            with self._lock:
                for rid in list(self._streams):
                    self._abort(rid)
        self._stop = True
        self._wake.set()
        if self._loop is not None:
            await asyncio.wrap_future(self._loop)
            self._loop = None
        if self.fine_tuning is not None:  # the loop has stopped: no micro-step runs beside the checkpoint
            await asyncio.to_thread(self.fine_tuning.checkpoint_now)
        await asyncio.to_thread(self._compute.close)

    # -- the loop thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                events = self._residency.install_loads() + self._residency.start_loads()
                slot = self.models.next_to_step()
                busy = slot is not None or any(self._needed(s) for s in self.models.slots)
                collect = self._residency.take_collect()
            if collect:  # after an unload, outside the lock: module graphs hold reference cycles
                gc.collect()
            self._dispatch(events)
            if slot is None:
                if not busy and self._stop:
                    return
                if self._train(idle=not busy):
                    continue
                if not events:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                continue
            start = time.perf_counter()
            self._step(slot)
            self._exclude_from_cycles(time.perf_counter() - start, slot)
            self._train(idle=False)

    def _train(self, idle: bool) -> bool:
        """One fine-tuning micro-step if one fits (the service decides, from every model's slack)."""
        if self.fine_tuning is None or self._stop:
            return False
        start = time.perf_counter()
        ran = self.fine_tuning.between_steps(self.models, self._lock, idle)
        self._exclude_from_cycles(time.perf_counter() - start)
        return ran

    def _exclude_from_cycles(self, seconds: float, own: ModelSlot | None = None) -> None:
        """Work that was not a model's own step (another model's step, a fine-tuning micro-step) is not that
        model's overhead: leave it out of the interval between its steps that its profile learns from."""
        with self._lock:
            for slot in self.models.loaded():
                if slot is not own:
                    slot.core.exclude_from_cycle(seconds)

    def _needed(self, slot: ModelSlot) -> bool:
        """Whether the loop must keep running for ``slot``; once stopping, a load nobody waits for is not."""
        if self._stop and slot.loading and not slot.pending:
            return slot.core is not None and slot.core.has_unfinished()
        return slot.busy()

    def _step(self, slot: ModelSlot) -> None:
        core = slot.core
        try:
            events = core.step(self._lock)
        except Exception as exc:  # a bug must not leave callers waiting forever
            log.exception("engine step of model %s failed; failing its in-flight requests", slot.name)
            self._dispatch(self._fail_all(slot, f"internal engine error: {exc}"))
            return
        with self._lock:
            self.models.charge(slot, core.last_step.duration_s)
            self._last_step = core.last_step
            self._steps_total += 1
        self._dispatch(events)
        if core.last_step is not None:
            for listener in self._listeners:
                try:
                    listener(core.last_step)
                except Exception:
                    log.exception("step listener failed")

    def _fail_all(self, slot: ModelSlot, message: str) -> list[EngineEvent]:
        with self._lock:
            ids = [rid for rid, owner in self._owner.items() if owner is slot]
            for rid in ids:
                slot.core.abort(rid)  # frees runner state at the next step
        return [RequestFailed(rid, "error", message) for rid in ids]

    def _finish(self, event: RequestFailed) -> None:
        """Deliver a failure decided outside any scheduler (lock held)."""
        stream = self._streams.pop(event.request_id, None)
        self._owner.pop(event.request_id, None)
        if stream is not None:
            stream.push(event)

    def _dispatch(self, events: list[EngineEvent]) -> None:
        for event in events:
            with self._lock:
                stream = self._streams.get(event.request_id)
                if stream is not None and isinstance(event, (GenerationResult, RequestFailed)):
                    del self._streams[event.request_id]
                    self._owner.pop(event.request_id, None)
            if stream is not None:
                stream.push(event)
