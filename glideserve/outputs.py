"""What the engine reports about a request: progress events and the final result."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from glideserve.params import GenerationParams


@dataclass
class RequestTimings:
    """Wall-clock seconds of a request's life, measured by the engine.

    ``queued_s``: arrival to first scheduled step; ``denoise_s``: first step to last
    step; ``decode_s``: its (batched) VAE decode; ``total_s``: arrival to image.
    ``full_steps``/``cached_steps``: how many of its ``steps`` ran every block and how
    many reused its feature cache.
    """

    queued_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0
    full_steps: int = 0
    cached_steps: int = 0

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class StepProgress:
    """Emitted after each denoising step of a request (``step`` counts from 1)."""

    request_id: str
    step: int
    total: int
    preview: Image.Image | None = None


@dataclass
class Queued:
    """Emitted while a request waits, whenever its position in the queue changes (0 = next)."""

    request_id: str
    position: int


@dataclass
class Loading:
    """Emitted once when a request arrives for a model whose weights are not resident:
    it waits for the load, predicted to take ``estimated_s`` more seconds."""

    request_id: str
    model: str
    estimated_s: float


@dataclass
class CascadeVerdict:
    """Why a cascade answered as it did: the discriminator's ``confidence`` in the light model's
    image, the ``threshold`` in force, and whether the request was sent on to the heavy model
    (``escalated``). ``reason`` is ``"confident"``, ``"below_threshold"`` or ``"heavy_refused"``
    (escalation was needed, but the heavy model could not take the request in time, or dropped it
    once it fell behind its deadline: the light image is the answer)."""

    light_model: str
    confidence: float
    threshold: float
    escalated: bool
    reason: str

    def as_dict(self) -> dict:
        return {"light_model": self.light_model, "confidence": float(f"{self.confidence:.6g}"),
                "threshold": float(f"{self.threshold:.6g}"), "escalated": self.escalated, "reason": self.reason}


@dataclass
class Escalated:
    """Emitted when a cascade sends a request on to its heavy model: the light model's ``image``
    (a preview of the answer to come) and the verdict."""

    request_id: str
    image: Image.Image
    verdict: CascadeVerdict


@dataclass
class GenerationResult:
    """A finished request: the image, the resolved parameters (seed included) and timings."""

    request_id: str
    image: Image.Image
    params: GenerationParams
    timings: RequestTimings = field(default_factory=RequestTimings)
    cascade: CascadeVerdict | None = None  # set when a cascade answered; ``params.model`` served it


@dataclass
class RequestFailed:
    """A request that ended without an image: ``reason`` is ``"aborted"``, ``"error"`` or the
    ``code`` of ``error``, the GlideServeError that refused it after it had been accepted (a
    request for an unloaded model is admitted by the model's scheduler only once it has loaded)."""

    request_id: str
    reason: str
    message: str = ""
    error: Exception | None = None


EngineEvent = StepProgress | Queued | Loading | Escalated | GenerationResult | RequestFailed
