"""Several models behind one engine loop: which are resident, which loads next, which steps next.

The engine loop (:class:`glideserve.AsyncEngine`) owns the threads; this module owns the
decisions, so they can be tested without a model:

- **Residency.** Every configured model has a :class:`ModelSlot`. Its weights are
  resident (``core`` set) or not; a budget of resident models (``max_loaded``) and of
  weight bytes (a :class:`MemoryLedger`) bounds them. A model that must load makes room
  by unloading the least recently used *idle* model (one with no request in flight); a
  busy one is never unloaded, so a load may wait for a model to go idle.
- **Offload.** With a host budget (``host_budget_bytes``), an unloaded model's
  EngineCore is *parked*: its weights move to host memory (CPU) and it comes back by a
  copy instead of a load from disk, its compiled graphs and profile intact. Parked
  models are held in a second ledger, least recently used dropped first when it is full.
- **Who steps next.** Steps are shared by step time, as a fair-share scheduler shares a
  CPU: each busy model accumulates the seconds its steps took (``vruntime``) and the one
  with the least goes next. ``set_shares`` weights it (a cascade's allocator gives its light
  and heavy model shares of step time): a step of ``s`` seconds costs ``s / share``. Deadlines
  override fairness for one step: when a model's most urgent request has less slack than the
  step the fair choice would take, that model goes first.
"""

from __future__ import annotations

import math

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from glideserve.errors import ModelLoadError
from glideserve.models.spec import ModelSpec
from glideserve.params import GenerationParams
from glideserve.scheduler.memory import MemoryLedger
from glideserve.scheduler.profile import LatencyProfile

if TYPE_CHECKING:
    from glideserve.config import EngineConfig
    from glideserve.engine.core import EngineCore

MODEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
LOAD_TIME_ALPHA = 0.5  # weight of the newest load in the load-time estimate


@dataclass(frozen=True)
class ModelSource:
    """One configured model: the ``name`` clients pass as ``model`` and the bundled name,
    diffusers folder or checkpoint file (``path``) it loads from."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "ModelSource":
        """``[NAME=]NAME_OR_PATH``; without ``NAME=``, the bundled name or the folder's (file's) name."""
        name, sep, path = text.partition("=")
        if sep and name.strip() and not set(name.strip()) <= MODEL_NAME_CHARS:
            name, sep, path = "", "", text  # an '=' inside a path, not NAME=PATH
        if not sep:
            name, path = "", text
        name, path = name.strip(), path.strip()
        if not path or (sep and not name):
            raise ValueError(f"--model {text!r} must be NAME=PATH or PATH")
        name = name or default_model_name(path)
        if not name or len(name) > 64 or not set(name) <= MODEL_NAME_CHARS:
            raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-'; "
                             "give one with NAME=PATH")
        return cls(name, path)


def default_model_name(path: str) -> str:
    """A bundled name as is; a folder or file by its own name (without a checkpoint suffix)."""
    p = Path(path)
    if p.exists():
        p = p.resolve()
        return p.stem if p.is_file() else p.name
    return p.stem if p.suffix in CHECKPOINT_SUFFIXES else p.name


@dataclass(eq=False)
class ModelSlot:
    """One configured model and what is known of it once it has been loaded.

    ``spec``, ``profile``, ``weights_bytes`` and ``load_s`` are learned at the first load
    and kept while the weights are unloaded, so requests for an unloaded model are
    validated and their latency (load included) predicted without the weights. ``pending``
    holds requests admitted while it was unloaded, in arrival order; the engine adds them
    to ``core`` once it has loaded. ``vruntime`` is the step time it has been given.
    ``parked`` is its core while offloaded to host memory; ``restore_s`` the learned time of a
    copy back (``load_s`` stays that of a load from disk).
    """

    source: ModelSource
    core: "EngineCore | None" = None
    spec: ModelSpec | None = None
    config: "EngineConfig | None" = None
    samplers: object = None  # the model's SamplerFactory (no weights): iteration counts while unloaded
    deadline_aware: bool = False  # whether its scheduling policy refuses requests that would be late
    profile: LatencyProfile | None = None
    weights_bytes: int = 0
    load_s: float = 0.0
    loads: int = 0
    unloads: int = 0
    loading: bool = False
    load_started: float = 0.0
    last_used: float = 0.0
    vruntime: float = 0.0
    share: float = 1.0  # relative weight of its step time (see ModelSet.set_shares)
    was_busy: bool = False
    pending: list = field(default_factory=list)
    parked: "EngineCore | None" = None  # unloaded, weights in host memory (see ModelSet's offload)
    parked_at: float = 0.0
    restoring: bool = False  # the load in progress is a copy back from host memory
    restore_s: float = 0.0
    restores: int = 0

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def loaded(self) -> bool:
        return self.core is not None

    def busy(self) -> bool:
        """A request is in flight or waiting for the load: the weights must stay."""
        return bool(self.pending) or self.loading or (self.core is not None and self.core.has_unfinished())

    def load_remaining_s(self, now: float) -> float:
        """Predicted seconds until the weights are resident (0 when they are)."""
        if self.core is not None:
            return 0.0
        restoring = self.restoring if self.loading else self.parked is not None
        expected = self.restore_s if restoring and self.restores else self.load_s
        if self.loading:
            return max(0.0, expected - (now - self.load_started))
        return expected

    def cold_latency_s(self, params: GenerationParams, now: float) -> float:
        """Predicted arrival-to-image seconds of resolved ``params`` arriving now while the model is
        not resident: the rest of the load, then the request alone (prefill, its steps, its decode)."""
        tokens = self.spec.tokens_per_row(params.height, params.width)
        steps = self.samplers.num_iterations(params.sampler, params.num_inference_steps, params.height,
                                             params.width, self.spec.vae_scale_factor)
        profile = self.profile
        alone = profile.prefill_s(1) + steps * profile.step_s([(tokens, 2 if params.uses_cfg else 1)]) \
            + profile.decode_s(tokens, 1)
        return self.load_remaining_s(now) + alone

    def record_load(self, core: "EngineCore", seconds: float, now: float) -> None:
        self.core, self.spec, self.profile = core, core.spec, core.scheduler.profile
        self.config, self.samplers = core.config, core.runner.samplers
        self.deadline_aware = core.scheduler.policy.deadline_aware
        self.weights_bytes = core.weights_bytes
        if self.restoring:  # a copy back from host memory: its own, much shorter, time
            self.restore_s = seconds if self.restores == 0 else \
                (1 - LOAD_TIME_ALPHA) * self.restore_s + LOAD_TIME_ALPHA * seconds
            self.restores += 1
        else:
            self.load_s = seconds if self.loads == 0 else \
                (1 - LOAD_TIME_ALPHA) * self.load_s + LOAD_TIME_ALPHA * seconds
        self.loads += 1
        self.restoring = False
        self.loading = False
        self.last_used = now

    def describe(self) -> dict:
        spec = self.spec
        return {"name": self.name, "path": self.source.path, "loaded": self.loaded, "loading": self.loading,
                "family": spec.family if spec else None,
                "default_size": f"{spec.default_width}x{spec.default_height}" if spec else None,
                "default_steps": spec.default_steps if spec else None,
                "weights_bytes": self.weights_bytes or None, "load_s": round(self.load_s, 3) if self.loads else None,
                "loads": self.loads, "unloads": self.unloads, "offloaded": self.parked is not None,
                "restores": self.restores, "restore_s": round(self.restore_s, 3) if self.restores else None,
                "compiled": self._compiled()}

    def _compiled(self) -> dict | None:
        compiled = self.core.runner.compiled if self.core is not None else None
        if compiled is None:
            return None
        return {"buckets": list(compiled.buckets.sizes), "graphs": compiled.stats.graphs,
                "compile_s": round(compiled.stats.compile_s, 2), "eager_calls": compiled.stats.eager_calls}


class ModelSet:
    """The configured models, the weights budget, and the choice of the next step and load.

    The first model is the default (a request naming none). Not thread-safe: the engine
    calls it under its lock. ``max_loaded`` (None: no limit) bounds resident models and
    ``weights_budget_bytes`` (None: no limit) their weight bytes; a single model larger
    than the byte budget is still served, alone.
    """

    def __init__(self, sources: list[ModelSource], max_loaded: int | None = None,
                 weights_budget_bytes: int | None = None, clock: Callable[[], float] = time.monotonic,
                 host_budget_bytes: int | None = None):
        if not sources:
            raise ValueError("configure at least one model")
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model name(s) {', '.join(duplicates)} given twice; name them apart with NAME=PATH")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded_models must be >= 1, got {max_loaded}")
        self.slots = [ModelSlot(s) for s in sources]
        self.max_loaded = max_loaded
        self.weights = MemoryLedger(weights_budget_bytes if weights_budget_bytes is not None else 2**62)
        self.host = None if host_budget_bytes is None else MemoryLedger(host_budget_bytes)
        self.clock = clock
        self.min_vruntime = 0.0  # the step time of the least served busy model, never decreasing
        self._by_name = {slot.name: slot for slot in self.slots}

    @property
    def default(self) -> ModelSlot:
        return self.slots[0]

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]

    def get(self, name: str | None) -> ModelSlot:
        """The slot serving ``name`` (None: the default); ModelLoadError (404) names the served ones."""
        if name is None:
            return self.default
        slot = self._by_name.get(name)
        if slot is None:
            raise ModelLoadError(f"model {name!r} is not served here; choose one of {', '.join(self.names)} "
                                 "(see GET /v1/models)", "model")
        return slot

    def loaded(self) -> list[ModelSlot]:
        return [slot for slot in self.slots if slot.core is not None]

    # -- residency --------------------------------------------------------------------
    def installed(self, slot: ModelSlot, core: "EngineCore", seconds: float) -> None:
        """Record a finished load and claim its weights."""
        slot.record_load(core, seconds, self.clock())
        self.weights.release(slot.name)
        # A load is only started with room for it; a lone model larger than the budget is served anyway.
        if not self.weights.claim(slot.name, slot.weights_bytes):
            self.weights.claim_over_budget(slot.name, slot.weights_bytes)

    def begin_load(self, slot: ModelSlot, now: float) -> None:
        """Mark ``slot`` loading and claim its weights now, so concurrent loads cannot overrun the budget."""
        slot.loading, slot.load_started = True, now
        slot.restoring = slot.parked is not None
        if not self.weights.claim(slot.name, slot.weights_bytes):
            self.weights.claim_over_budget(slot.name, slot.weights_bytes)

    def load_failed(self, slot: ModelSlot) -> None:
        slot.loading = slot.restoring = False
        self.weights.release(slot.name)

    def unload(self, slot: ModelSlot) -> list["EngineCore"]:
        """Unload ``slot``; with a host budget park its core there (the caller offloads it). Returns the
        parked cores dropped to make room, whose weights the caller lets go."""
        core, slot.core = slot.core, None
        slot.unloads += 1
        self.weights.release(slot.name)
        if self.host is None or slot.weights_bytes > self.host.budget_bytes:
            return []
        dropped = []
        parked = sorted((s for s in self.slots if s.parked is not None), key=lambda s: s.parked_at)
        while not self.host.claim(slot.name, slot.weights_bytes):
            oldest = parked.pop(0)
            dropped.append(oldest.parked)
            oldest.parked = None
            self.host.release(oldest.name)
        slot.parked, slot.parked_at = core, self.clock()
        return dropped

    def unpark(self, slot: ModelSlot) -> "EngineCore | None":
        """The parked core of ``slot`` (None if it has none), no longer counted in host memory."""
        core, slot.parked = slot.parked, None
        if core is not None:
            self.host.release(slot.name)
        return core

    def victims_for(self, slot: ModelSlot) -> list[ModelSlot] | None:
        """Idle resident models to unload, least recently used first, so that ``slot`` fits;
        None when it cannot fit until a busy model goes idle."""
        resident = [s for s in self.slots if (s.core is not None or s.loading) and s is not slot]
        idle = sorted((s for s in resident if s.core is not None and not s.busy()), key=lambda s: s.last_used)
        victims: list[ModelSlot] = []
        free = self.weights.free
        count = len(resident)
        while (self.max_loaded is not None and count + 1 > self.max_loaded) or \
                (slot.weights_bytes > free and count > 0):
            if not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            free += victim.weights_bytes
            count -= 1
        return victims

    def excess(self, keep: ModelSlot) -> list[ModelSlot]:
        """Idle resident models (never ``keep``) to unload, least recently used first, until the resident
        ones fit both budgets: for loads whose size was not known before they happened (the first)."""
        idle = sorted((s for s in self.loaded() if s is not keep and not s.busy()), key=lambda s: s.last_used)
        victims, used, count = [], self.weights.used, len(self.loaded())
        while idle and (used > self.weights.budget_bytes or (self.max_loaded is not None and count > self.max_loaded)):
            victim = idle.pop(0)
            victims.append(victim)
            used -= victim.weights_bytes
            count -= 1
        return victims

    def to_load(self) -> list[ModelSlot]:
        """Unloaded models with requests waiting for them, oldest waiting first."""
        waiting = [s for s in self.slots if s.core is None and not s.loading and s.pending]
        return sorted(waiting, key=lambda s: s.pending[0].arrival)

    # -- who steps next ---------------------------------------------------------------
    def next_to_step(self) -> ModelSlot | None:
        """The resident model that runs the next step, or None when none has work."""
        busy = [s for s in self.slots if s.core is not None and s.core.has_unfinished()]
        for slot in self.slots:
            if slot in busy and not slot.was_busy:
                # No credit banked while idle: a model coming back starts at the set's clock.
                slot.vruntime = max(slot.vruntime, self.min_vruntime)
            slot.was_busy = slot in busy
        if not busy:
            return None
        fair = min(busy, key=lambda s: s.vruntime)
        self.min_vruntime = max(self.min_vruntime, fair.vruntime)
        if len(busy) == 1:
            return fair
        now = self.clock()
        fair_step_s = fair.core.last_step.duration_s if fair.core.last_step else 0.0
        slacks = [(s.core.scheduler.least_slack_s(now), i, s) for i, s in enumerate(busy)]
        slacks = [entry for entry in slacks if entry[0] is not None]
        if slacks:
            slack, _, urgent = min(slacks)
            # Only a request that waiting would make late: one already late gains nothing by starving others.
            if urgent is not fair and 0 <= slack < fair_step_s:
                return urgent
        return fair

    def charge(self, slot: ModelSlot, seconds: float) -> None:
        """Account a step of ``slot`` that took ``seconds`` (weighted by its share)."""
        slot.vruntime += seconds / slot.share
        slot.last_used = self.clock()

    def set_shares(self, shares: dict[str, float]) -> None:
        """Relative step-time weights of the named models (others keep theirs): while several are busy,
        each gets step time in proportion to its share."""
        for name, share in shares.items():
            if not share > 0:
                raise ValueError(f"the share of {name!r} must be positive, got {share}")
            self.get(name).share = float(share)

    def least_slack_s(self, now: float) -> float:
        """The least slack of every resident model's requests, their admission margins kept (inf when none
        has work); 0 while a best-effort request or a load waits: those want the machine now and have no
        slack to lend (to fine-tuning)."""
        slack = math.inf
        for slot in self.slots:
            if slot.pending:
                return 0.0
            core = slot.core
            if core is None or not core.has_unfinished():
                continue
            least = core.scheduler.least_slack_s(now, keep_margin=True)
            if least is None or core.scheduler.has_best_effort():
                return 0.0
            slack = min(slack, least)
        return slack
