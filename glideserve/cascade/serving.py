"""A cascade served live: the light model answers, the discriminator decides, the heavy model if it must.

``CascadeBackend`` is a server backend (see ``glideserve.server.backend``) over one
:class:`glideserve.AsyncEngine` that serves both models. A request that names no model
runs the cascade; one that names the light or heavy model runs on it directly (the server
maps ``cascade: false`` to the heavy model). ``ThresholdController`` sets the threshold:
fixed (a static cascade), or re-planned every ``interval_s`` by the allocation MILP on this
machine (``threshold=auto``), which also sets the two models' shares of step time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from glideserve.cascade import allocator
from glideserve.cascade.profiles import CascadeProfile, EscalationProfile, ModelProfile
from glideserve.errors import GlideServeError
from glideserve.outputs import CascadeVerdict, EngineEvent, Escalated, GenerationResult, RequestFailed
from glideserve.params import GenerationParams

log = logging.getLogger(__name__)

BUNDLED_DISCRIMINATORS = Path(__file__).resolve().parents[1] / "data" / "discriminators"
PROFILE_BATCHES = (1, 2, 4, 8)


def default_discriminator(light: str) -> str:
    """The bundled discriminator folder of a light model (named after it)."""
    return str(BUNDLED_DISCRIMINATORS / Path(light).name)


@dataclass(frozen=True)
class CascadeConfig:
    """``light=MODEL,heavy=MODEL[,discriminator=PATH][,threshold=T|auto][,interval=S]``, validated."""

    light: str
    heavy: str
    discriminator: str
    threshold: float | None  # None: re-planned by the allocator (auto)
    interval_s: float = 5.0

    @classmethod
    def parse(cls, text: str) -> "CascadeConfig":
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ValueError(f"--cascade parts are KEY=VALUE, got {part!r}")
            if key not in ("light", "heavy", "discriminator", "threshold", "interval"):
                raise ValueError(f"--cascade has no key {key!r}; use light, heavy, discriminator, threshold, interval")
            fields[key] = value
        if "light" not in fields or "heavy" not in fields:
            raise ValueError("--cascade needs light=MODEL and heavy=MODEL")
        if fields["light"] == fields["heavy"]:
            raise ValueError("--cascade needs two different models")
        threshold = fields.get("threshold", "auto")
        if threshold == "auto":
            value = None
        else:
            try:
                value = float(threshold)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--cascade threshold must be 'auto' or a number in [0, 1], got {threshold!r}")
        interval = float(fields.get("interval", 5.0))
        if not 0.1 <= interval <= 3600:
            raise ValueError(f"--cascade interval must be 0.1..3600 seconds, got {interval}")
        disc = fields.get("discriminator") or default_discriminator(fields["light"])
        return cls(fields["light"], fields["heavy"], disc, value, interval)


def model_profile(slot, batches=PROFILE_BATCHES) -> ModelProfile:
    """Seconds a batch of b requests at the model's defaults takes, from its measured step-level profile."""
    spec, profile = slot.spec, slot.profile
    tokens = spec.tokens_per_row(spec.default_height, spec.default_width)
    rows = 2 if spec.default_guidance > 1.0 else 1
    latency = tuple(profile.prefill_s(b) + spec.default_steps * profile.step_s([(tokens, rows * b)])
                    + profile.decode_s(tokens, b) for b in batches)
    return ModelProfile(slot.name, tuple(batches), latency)


class SharedMachinePlacement:
    """Where a plan lands on one machine: both models' step-time shares of one engine (``capacity`` 1.0)."""

    capacity = 1.0
    integral = False

    def __init__(self, models):
        self.models = models

    def spec(self, name: str):
        return self.models.get(name).spec

    def profile(self, name: str) -> ModelProfile:
        return model_profile(self.models.get(name))

    def apply(self, plan: allocator.Allocation, light: str, heavy: str) -> None:
        light_share, heavy_share = allocator.step_shares(plan)
        self.models.set_shares({light: light_share, heavy: heavy_share})


class ThresholdController:
    """The threshold in force, and (``auto``) the loop that re-plans it and the capacity of each model.

    ``placement`` turns a plan into capacity: step-time shares of one machine
    (SharedMachinePlacement) or replica counts of a cluster; it also gives the models' profiles.
    """

    def __init__(self, config: CascadeConfig, placement, escalation: EscalationProfile, slo_s: float | None,
                 clock=time.monotonic):
        if config.threshold is None and slo_s is None:
            raise ValueError("--cascade threshold=auto plans against an SLO: give --default-slo-ms")
        self.config = config
        self.placement = placement
        self.escalation = escalation
        self.slo_s = slo_s
        self.clock = clock
        self.threshold = config.threshold if config.threshold is not None else 0.5
        self.estimator = allocator.DemandEstimator()
        self.arrivals = 0
        self.last_plan: allocator.Allocation | None = None
        self._since = clock()
        self._task: asyncio.Task | None = None

    def profile(self) -> CascadeProfile:
        return CascadeProfile(self.placement.profile(self.config.light), self.placement.profile(self.config.heavy),
                              self.escalation, self.slo_s if self.slo_s is not None else 1e9)

    def replan(self) -> allocator.Allocation | None:
        """One planning round on the arrivals since the last; None when there is no SLO to plan against."""
        now = self.clock()
        demand = self.estimator.update(self.arrivals, max(1e-3, now - self._since))
        self.arrivals, self._since = 0, now
        if self.slo_s is None:
            return None
        plan = allocator.solve(self.profile(), demand, self.placement.capacity, integral=self.placement.integral,
                               fixed_threshold=self.config.threshold)
        self.threshold = plan.threshold
        self.placement.apply(plan, self.config.light, self.config.heavy)
        self.last_plan = plan
        return plan

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.replan()
            except (ValueError, RuntimeError) as exc:  # no latency profile yet, say: keep the last plan
                log.warning("cascade allocation failed, keeping threshold %.3f: %s", self.threshold, exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class CascadeStream:
    """One cascade request's events: the light model's, then (escalated) an ``Escalated`` preview and the
    heavy model's. Its ``GenerationResult`` carries the verdict."""

    def __init__(self, backend: "CascadeBackend", request_id: str, params: GenerationParams, light_stream):
        self.backend = backend
        self.request_id = request_id
        self.params = light_stream.params
        self._raw = params
        self._current = light_stream
        self._aborted = False
        self._arrival = time.monotonic()

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def abort(self) -> bool:
        self._aborted = True
        return await self.backend.engine.abort(self._current.request_id)

    async def _events(self) -> AsyncIterator[EngineEvent]:
        b = self.backend
        light_result = None
        async for event in self._current:
            if isinstance(event, GenerationResult):
                light_result = event
            else:
                yield event
        if light_result is None:
            return  # failed or aborted: the RequestFailed was forwarded
        confidence = float((await asyncio.to_thread(b.discriminator.confidence, [light_result.image]))[0])
        if self._aborted:  # cancelled while the discriminator looked
            yield RequestFailed(self.request_id, "aborted", "the request was cancelled")
            return
        threshold = b.controller.threshold
        if confidence >= threshold:
            light_result.cascade = b.record(CascadeVerdict(b.config.light, confidence, threshold, False, "confident"))
            yield light_result
            return
        verdict = CascadeVerdict(b.config.light, confidence, threshold, True, "below_threshold")
        yield Escalated(self.request_id, light_result.image, verdict)
        heavy = dataclasses.replace(self._raw, model=b.config.heavy, seed=self.params.seed,
                                    request_id=None, slo_ms=self._remaining_slo_ms())
        try:
            self._current = await b.engine.add_request(heavy, request_id=f"{self.request_id}.heavy")
        except GlideServeError as exc:  # shutting down, full, or too late
            yield self._light_answer(light_result, verdict, f"refused: {exc.message}")
            return
        async for event in self._current:
            if isinstance(event, RequestFailed) and event.reason != "aborted" and not self._aborted:
                # Admitted, then dropped (it fell behind its deadline) or failed.
                yield self._light_answer(light_result, verdict, f"gave up: {event.reason}")
                return
            if isinstance(event, GenerationResult):
                event.cascade = b.record(verdict)
                event.timings.total_s = time.monotonic() - self._arrival
            yield event

    def _light_answer(self, light_result: GenerationResult, verdict: CascadeVerdict, why: str) -> GenerationResult:
        """The light image as the answer of an escalation the heavy model did not serve (``heavy_refused``)."""
        light_result.cascade = self.backend.record(dataclasses.replace(verdict, escalated=False,
                                                                       reason="heavy_refused"))
        log.info("cascade %s: heavy model %s; answering with the light image", self.request_id, why)
        return light_result

    def _remaining_slo_ms(self) -> float | None:
        if self._raw.slo_ms is None:
            return None
        return max(1.0, self._raw.slo_ms - 1000.0 * (time.monotonic() - self._arrival))


class CascadeBackend:
    """A server backend: the engine's two models as a cascade for requests that name no model."""

    def __init__(self, engine, config: CascadeConfig, discriminator, controller: ThresholdController):
        self.engine = engine
        self.config = config
        self.discriminator = discriminator
        self.controller = controller
        self.counts = {"light": 0, "heavy": 0, "escalated": 0, "heavy_refused": 0}
        self._cascades: dict[str, CascadeStream] = {}

    @property
    def spec(self):
        return self.controller.placement.spec(self.config.heavy)

    async def start(self) -> None:
        await self.engine.start()
        self.controller.start()

    async def add_request(self, params: GenerationParams, request_id: str | None = None):
        if params.model is not None:
            return await self.engine.add_request(params, request_id)
        light = dataclasses.replace(params, model=self.config.light)
        stream = await self.engine.add_request(light, request_id)
        self.controller.arrivals += 1
        cascade = CascadeStream(self, stream.request_id, params, stream)
        self._cascades[cascade.request_id] = cascade
        return _Forget(cascade, self._cascades)

    def record(self, verdict: CascadeVerdict) -> CascadeVerdict:
        """Count a verdict (``/metrics``) and hand it back."""
        self.counts["heavy" if verdict.escalated else "light"] += 1
        self.counts["escalated"] += verdict.escalated
        self.counts["heavy_refused"] += verdict.reason == "heavy_refused"
        return verdict

    async def abort(self, request_id: str) -> bool:
        cascade = self._cascades.get(request_id)
        if cascade is not None:
            return await cascade.abort()
        return await self.engine.abort(request_id)

    def stats(self):
        return self.engine.stats()

    def add_step_listener(self, fn) -> None:
        self.engine.add_step_listener(fn)

    def model_cards(self) -> list[dict]:
        return self.engine.model_cards()

    def loras(self, model: str | None = None) -> list[dict]:
        return self.engine.loras(model or self.config.heavy)

    def add_lora(self, name: str, data: bytes, model: str | None = None) -> dict:
        return self.engine.add_lora(name, data, model or self.config.heavy)

    def delete_lora(self, name: str, model: str | None = None) -> None:
        self.engine.delete_lora(name, model or self.config.heavy)

    def describe(self) -> dict:
        """The cascade's state for health pages and metrics."""
        plan = self.controller.last_plan
        return {"light": self.config.light, "heavy": self.config.heavy, "threshold": self.controller.threshold,
                "policy": "auto" if self.config.threshold is None else "static", "counts": dict(self.counts),
                "plan": None if plan is None else plan.as_dict()}

    async def shutdown(self, drain: bool = True) -> None:
        # The controller stops first; in-flight cascades finish (an escalation the engine refuses while
        # draining answers with the light image), then the engine drains.
        await self.controller.stop()
        await self.engine.shutdown(drain)


class _Forget:
    """The cascade stream, unregistered from its backend once its events end."""

    def __init__(self, cascade: CascadeStream, registry: dict):
        self._cascade, self._registry = cascade, registry
        self.request_id, self.params = cascade.request_id, cascade.params

    async def __aiter__(self):
        try:
            async for event in self._cascade:
                yield event
        finally:
            self._registry.pop(self.request_id, None)


def build_cascade_backend(engine, config: CascadeConfig, slo_ms: float | None, placement=None) -> CascadeBackend:
    """Wire an engine serving ``config.light`` and ``config.heavy`` into a cascade (loads the discriminator).

    ``placement`` (default: the engine's models sharing one machine) carries out the allocator's plans."""
    from glideserve.cascade import discriminator as disc_mod

    names = {card["name"] for card in engine.model_cards()}
    for name in (config.light, config.heavy):
        if name not in names:
            raise ValueError(f"--cascade model {name!r} is not served; serve it with --model too")
    disc = disc_mod.load(config.discriminator)
    table = disc.report.get("escalated_fraction_at_threshold")
    if not table:
        raise ValueError(f"discriminator {config.discriminator} has no measured f(t); retrain it with "
                         "`glideserve cascade train-discriminator`")
    escalation = EscalationProfile.from_table(table)
    placement = placement if placement is not None else SharedMachinePlacement(engine.models)
    controller = ThresholdController(config, placement, escalation, None if slo_ms is None else slo_ms / 1000.0)
    return CascadeBackend(engine, config, disc, controller)
