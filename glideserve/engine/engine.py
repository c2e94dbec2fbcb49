"""Engine: the synchronous Python API over EngineCore."""

from __future__ import annotations

from tqdm import tqdm

from glideserve.engine.core import EngineCore
from glideserve.errors import GlideServeError
from glideserve.models.spec import ModelSpec
from glideserve.outputs import EngineEvent, GenerationResult, RequestFailed, StepProgress
from glideserve.params import GenerationParams


class Engine:
    """Blocking API: ``generate`` runs a list of requests through the step-level engine.

    All requests are admitted together and batched step by step; results come back
    in input order. For request-at-a-time control (arrivals between steps) use
    ``add_request``/``step``/``has_unfinished`` directly.
    """

    def __init__(self, core: EngineCore):
        self.core = core

    @classmethod
    def from_pretrained(cls, model: str, **options) -> "Engine":
        """Load a bundled name, diffusers folder or checkpoint; options are EngineConfig fields
        (flat, scheduler ones included), ``config=EngineConfig(...)``, ``single_file_config``
        and ``allow_unsafe_pickle``."""
        return cls(EngineCore.load(model, **options))

    @property
    def spec(self) -> ModelSpec:
        return self.core.spec

    def add_request(self, params: GenerationParams, request_id: str | None = None) -> str:
        return self.core.add_request(params, request_id).request_id

    def step(self) -> list[EngineEvent]:
        return self.core.step()

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def generate(self, params: list[GenerationParams], progress: bool = False) -> list[GenerationResult]:
        # Validate everything first, so a bad request fails the call before any work runs.
        config = self.core.config
        resolved = [p.resolve(self.spec, config.max_image_side, config.default_cache,
                               config.latent_aware) for p in params]
        requests = [self.core.add_request(p) for p in resolved]
        ids = [r.request_id for r in requests]
        results: dict[str, GenerationResult] = {}
        failures: dict[str, str] = {}
        bar = tqdm(total=sum(r.num_steps for r in requests), unit="step", disable=not progress, desc="denoising")
        while self.has_unfinished():
            for event in self.step():
                if isinstance(event, StepProgress):
                    bar.update(1)
                elif isinstance(event, GenerationResult):
                    results[event.request_id] = event
                elif isinstance(event, RequestFailed):
                    failures[event.request_id] = event.message
        bar.close()
        if failures:
            rid, message = next(iter(failures.items()))
            raise GlideServeError(f"{len(failures)} request(s) failed; first ({rid}): {message}")
        return [results[i] for i in ids]
