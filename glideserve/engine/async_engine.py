"""AsyncEngine: the engine loop on its own thread, with asyncio streams per request."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from glideserve.engine.compute_thread import ComputeThread
from glideserve.engine.core import EngineCore, StepStats
from glideserve.engine.stream import RequestStream
from glideserve.errors import EngineStoppedError, InvalidRequestError
from glideserve.models.spec import ModelSpec
from glideserve.outputs import EngineEvent, GenerationResult, RequestFailed
from glideserve.params import GenerationParams, resolve_lora

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for health pages and metrics.

    The ``*_total`` fields count since start: requests refused at admission because
    they could not meet their deadline, admitted requests dropped for lateness, and
    preemptions and resumes at step boundaries (zero for backends that do none).
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
    """Runs EngineCore steps on a background thread for asyncio callers.

    The loop runs on ``compute`` (see :mod:`glideserve.engine.compute_thread`);
    ``from_pretrained`` loads and profiles the model on that same thread.

    ``add_request`` validates and enqueues at once (raising InvalidRequestError,
    QueueFullError or EngineStoppedError before any event), and returns a
    RequestStream of Queued / StepProgress events ending in a GenerationResult or a
    RequestFailed. ``abort`` frees a request at the next step. ``shutdown(drain=True)``
    stops admission and returns once every admitted request has finished.
    """

    def __init__(self, core: EngineCore, compute: ComputeThread | None = None):
        self.core = core
        self._compute = compute or ComputeThread("glideserve-engine")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._loop: Future | None = None
        self._accepting = True
        self._stop = False

    @classmethod
    def from_pretrained(cls, model: str, **options) -> "AsyncEngine":
        """Load a bundled name, diffusers folder or checkpoint; options are EngineConfig fields
        (flat, scheduler ones included), ``config=EngineConfig(...)``, ``single_file_config``
        and ``allow_unsafe_pickle``."""
        compute, core = ComputeThread.starting_with("glideserve-engine", EngineCore.load, model, **options)
        return cls(core, compute)

    @property
    def spec(self) -> ModelSpec:
        return self.core.spec

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
        store = self.core.runner.loras
        if store is not None and params.lora:
            # Read adapter files off the event loop and outside the engine lock; admission then finds them resident.
            for name, _ in resolve_lora(params.lora):
                await asyncio.to_thread(store.get, name)
        with self._lock:
            request = self.core.add_request(params, request_id)
            stream = RequestStream(request.request_id, request.params, loop)
            self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    async def generate(self, params: GenerationParams, request_id: str | None = None) -> AsyncIterator[EngineEvent]:
        stream = await self.add_request(params, request_id)
        async for event in stream:
            yield event

    async def abort(self, request_id: str) -> bool:
        with self._lock:
            found = self.core.abort(request_id)
        self._wake.set()
        return found

    def loras(self) -> list[dict]:
        store = self.core.runner.loras
        return [] if store is None else store.describe()

    def add_lora(self, name: str, data: bytes) -> dict:
        return self._lora_store().add(name, data)

    def delete_lora(self, name: str) -> None:
        self._lora_store().delete(name)

    def _lora_store(self):
        if self.core.runner.loras is None:
            raise InvalidRequestError("this server serves no LoRA adapters (start it with --lora-dir DIR)", "lora")
        return self.core.runner.loras

    def stats(self) -> EngineStats:
        last = self.core.last_step
        sched = self.core.scheduler
        counters = sched.counters
        return EngineStats(sched.num_waiting, sched.num_running, self.core.steps_total,
                           last.duration_s if last else 0.0, last.num_rows if last else 0,
                           last.num_requests if last else 0, num_paused=sched.num_paused,
                           refused_total=counters.refused, dropped_total=counters.dropped,
                           preempted_total=counters.preempted, resumed_total=counters.resumed)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    async def shutdown(self, drain: bool = True) -> None:
        self._accepting = False
        if not drain:
            with self._lock:
                for rid in list(self._streams):
                    self.core.abort(rid)
        self._stop = True
        self._wake.set()
        if self._loop is not None:
            await asyncio.wrap_future(self._loop)
            self._loop = None
        await asyncio.to_thread(self._compute.close)

    # -- the loop thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                busy = self.core.has_unfinished()
            if not busy:
                if self._stop:
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.core.step(self._lock)
            except Exception as exc:  # a bug must not leave callers waiting forever
                log.exception("engine step failed; failing in-flight requests")
                events = self._fail_all(f"internal engine error: {exc}")
            self._dispatch(events)
            if self.core.last_step is not None:
                for listener in self._listeners:
                    try:
                        listener(self.core.last_step)
                    except Exception:
                        log.exception("step listener failed")

    def _fail_all(self, message: str) -> list[EngineEvent]:
        with self._lock:
            ids = list(self._streams)
            for rid in ids:
                self.core.abort(rid)  # frees runner state at the next step
        return [RequestFailed(rid, "error", message) for rid in ids]

    def _dispatch(self, events: list[EngineEvent]) -> None:
        for event in events:
            with self._lock:
                stream = self._streams.get(event.request_id)
                if stream is not None and isinstance(event, (GenerationResult, RequestFailed)):
                    del self._streams[event.request_id]
            if stream is not None:
                stream.push(event)

