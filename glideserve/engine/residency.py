"""Which models are resident: the engine loop's loads, installs, offloads and unloads."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from glideserve.engine.core import EngineCore
from glideserve.engine.model_set import ModelSet, ModelSlot, ModelSource
from glideserve.engine.startup import StartupProgress
from glideserve.errors import GlideServeError
from glideserve.outputs import EngineEvent, RequestFailed
from glideserve.params import GenerationParams
from glideserve.scheduler.profile import LatencyProfile
from glideserve.scheduler.scheduler import SchedulerCounters

log = logging.getLogger(__name__)
# (source, profile to keep or None, start-up progress or None) -> the loaded core
ModelLoader = Callable[[ModelSource, "LatencyProfile | None", "StartupProgress | None"], EngineCore]


@dataclass
class PendingRequest:
    """A request admitted for a model that was not resident; it joins the model's scheduler after the load."""

    params: GenerationParams
    request_id: str
    arrival: float


class ModelResidency:
    """Moves the models of a ModelSet in and out of memory on behalf of AsyncEngine's loop.

    ``load_all`` runs once at start-up on the compute thread. The rest is called with the
    engine's lock held: ``start_loads`` begins the loads that waiting requests need, each
    on a short-lived thread so the resident models keep stepping; ``install_loads`` makes
    finished loads resident and hands their ``PendingRequest``s to the new scheduler
    (or fails them with the load's error); ``unload`` offloads an idle model to host
    memory or drops it, keeping its scheduler's counters in ``retired`` so totals never
    go backwards. ``take_collect`` says once, after an unload, that module graphs were
    released and the caller should ``gc.collect()`` outside the lock.
    """

    def __init__(self, models: ModelSet, loader: ModelLoader, lock: threading.Lock, wake: threading.Event):
        self.models = models
        self.retired = SchedulerCounters()  # counters of cores unloaded since start, and cold refusals
        self._loader = loader
        self._lock = lock
        self._wake = wake
        self._finished: list[tuple[ModelSlot, EngineCore | None, float, BaseException | None]] = []
        self._collect = False

    def load_all(self, startup: StartupProgress | None = None) -> None:
        """Load (and profile) every model once, the default last, unloading what exceeds the budgets."""
        for slot in [*self.models.slots[1:], self.models.default]:
            for victim in self.models.victims_for(slot) or []:
                self.unload(victim)
            start = time.perf_counter()
            core = self._loader(slot.source, None, startup)
            self.models.installed(slot, core, time.perf_counter() - start)
            for victim in self.models.excess(keep=slot):  # its size is known only now
                self.unload(victim)
            log.info("model %s loaded in %.2f s (%.1f MiB of weights)", slot.name, slot.load_s,
                     slot.weights_bytes / 2**20)

    def take_collect(self) -> bool:
        collect, self._collect = self._collect, False
        return collect

    def start_loads(self) -> list[EngineEvent]:
        """Begin loading models that requests wait for, unloading idle ones to make room."""
        events: list[EngineEvent] = []
        for slot in self.models.to_load():
            victims = self.models.victims_for(slot)
            if victims is None:
                continue  # every resident model is busy: wait for one to go idle
            for victim in victims:
                self.unload(victim)
            self.models.begin_load(slot, time.monotonic())
            log.info("loading model %s for %d waiting request(s)", slot.name, len(slot.pending))
            try:
                # A short-lived thread, so the resident models keep stepping; its OpenMP pool dies with it.
                threading.Thread(target=self._load_in_background, args=(slot, self.models.unpark(slot)),
                                 name=f"glideserve-load-{slot.name}", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: fail the waiting requests, not the loop
                self.models.load_failed(slot)
                pending, slot.pending = slot.pending, []
                events += [RequestFailed(p.request_id, "error", f"loading model {slot.name} failed: {exc}")
                           for p in pending]
        return events

    def _load_in_background(self, slot: ModelSlot, parked: EngineCore | None = None) -> None:
        start = time.perf_counter()
        core, error = None, None
        try:
            if parked is not None:
                parked.restore()
                core = parked
            else:
                core = self._loader(slot.source, slot.profile, None)
        except BaseException as exc:  # handed to the loop, which fails the waiting requests
            error = exc
        with self._lock:
            self._finished.append((slot, core, time.perf_counter() - start, error))
        self._wake.set()

    def install_loads(self) -> list[EngineEvent]:
        """Make finished loads resident and hand their waiting requests to their schedulers."""
        events: list[EngineEvent] = []
        for slot, core, seconds, error in self._finished:
            pending, slot.pending = slot.pending, []
            if error is not None:
                self.models.load_failed(slot)
                log.error("loading model %s failed: %s", slot.name, error)
                events += [RequestFailed(p.request_id, "error", f"loading model {slot.name} failed: {error}")
                           for p in pending]
                continue
            self.models.installed(slot, core, seconds)
            log.info("model %s loaded in %.2f s", slot.name, seconds)
            for p in pending:
                try:
                    core.add_request(p.params, p.request_id, arrival_time=p.arrival)
                except GlideServeError as exc:
                    events.append(RequestFailed(p.request_id, exc.code, exc.message, error=exc))
                except Exception as exc:  # a bug fails this request, not the loop and every model with it
                    log.exception("admitting %s after the load of %s failed", p.request_id, slot.name)
                    events.append(RequestFailed(p.request_id, "error", f"internal engine error: {exc}"))
        self._finished.clear()
        return events

    def unload(self, slot: ModelSlot) -> None:
        counters = slot.core.scheduler.counters
        for name in ("refused", "dropped", "held_back", "preempted", "resumed"):
            setattr(self.retired, name, getattr(self.retired, name) + getattr(counters, name))
        core = slot.core
        self.models.unload(slot)
        self._collect = True
        if slot.parked is core:  # host memory has room: a copy back, not a load from disk, when needed again
            core.offload()
            log.info("offloaded model %s (least recently used, idle) to host memory", slot.name)
        else:
            log.info("unloaded model %s (least recently used, idle) to stay within the weights budget", slot.name)
