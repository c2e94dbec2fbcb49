"""Wire schemas of the HTTP API: the OpenAI images request and response, the stream
events, the error envelope, and the server's own small endpoints.

Requests are validated strictly (no string-to-number coercion, unknown fields
rejected) so that a client's mistake is answered with a 400 that names the field
instead of being silently reinterpreted.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glideserve.errors import InvalidRequestError
from glideserve.params import (MAX_GUIDANCE, MAX_PARTIAL_IMAGES, MAX_PRIORITY, MAX_PROMPT_CHARS, MAX_SEED,
                               MAX_SLO_MS, MAX_STEPS, parse_size)
from glideserve.server.validation import check_text

MAX_IMAGES_PER_REQUEST = 8
MAX_USER_CHARS = 256


def _require_utf8(text: str | None, field: str) -> str | None:
    # JSON admits lone surrogate escapes ("\ud800"); they cannot be tokenized or echoed back.
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field} contains an unpaired surrogate; send valid Unicode text") from None
    return text


class LoraRef(BaseModel):
    """One adapter of a request: its name in the server's LoRA directory and its scale."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(max_length=64)
    scale: float = Field(default=1.0, ge=-8.0, le=8.0, allow_inf_nan=False)


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``: OpenAI's fields plus diffusion extensions.

    ``size`` is ``"WIDTHxHEIGHT"`` (or ``"auto"`` for the model's default); ``n``
    images use seeds ``seed, seed+1, ...``. Extension fields (``seed``,
    ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``sampler``,
    ``slo_ms``, ``priority``, ``cache``, ``latent_aware``, ``lora``) travel in the OpenAI client's ``extra_body``.
    Range checks that depend on the model (size multiple, sampler names) happen
    when the engine admits the request.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, max_length=512)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(default=None, max_length=32, description='"WIDTHxHEIGHT", e.g. "512x512", or "auto"')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png"] = "png"
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES,
                                description="with stream=true: low-resolution previews sent during denoising")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    sampler: str | None = Field(default=None, max_length=64)
    slo_ms: float | None = Field(default=None, gt=0, le=MAX_SLO_MS, allow_inf_nan=False,
                                 description="latency target from arrival to image, in milliseconds (default: the "
                                             "server's --default-slo-ms). The deadline-aware schedulers order by "
                                             "it, refuse at once (429 slo_unattainable) a request predicted to "
                                             "miss it, and may drop (503 deadline_exceeded) one that falls far "
                                             "behind. Omitted without a server default: best effort")
    priority: int | None = Field(default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                                 description="higher is served first among equals: it orders best-effort "
                                             "requests (no slo_ms) and breaks ties between requests with equal "
                                             "deadlines or slack; it never overrides a deadline")
    cache: str | None = Field(default=None, max_length=32,
                              description="step-caching policy for this request: none (exact), glideserve:N, "
                                          "fora:N, taylorseer:N, teacache:T or fbcache:T (default: the "
                                          "server's --cache)")
    latent_aware: bool | None = Field(default=None, description="latent-aware denoising (SD3 models; default: "
                                                                "the server's --latent-aware)")
    lora: str | list[LoraRef] | None = Field(default=None, description="LoRA adapters from the server's "
                                             "--lora-dir: a name (scale 1.0) or a list of {name, scale}, at most 8")
    cascade: bool | None = Field(default=None, description="on a server run with --cascade: false answers from "
                                 "the heavy model directly; true (the default for requests naming no model or "
                                 "'cascade') lets the light model answer when the discriminator is confident")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        return check_text(_require_utf8(value, "prompt"), "prompt", allow_empty=False)

    @field_validator("negative_prompt", "user", "sampler", "model", "cache")
    @classmethod
    def _utf8_text(cls, value: str | None, info) -> str | None:
        if value is None:
            return None
        return check_text(_require_utf8(value, info.field_name), info.field_name, allow_empty=True)

    def height_width(self) -> tuple[int | None, int | None]:
        """``(height, width)`` from ``size``; ``(None, None)`` asks for the model's default."""
        if self.size is None or self.size == "auto":
            return None, None
        return parse_size(self.size)

    def seeds(self, base: int) -> list[int]:
        """The seed of each of the ``n`` images; raises InvalidRequestError past the seed range."""
        if base + self.n - 1 > MAX_SEED:
            raise InvalidRequestError(
                f"seed + n - 1 must not exceed {MAX_SEED}; use a seed of at most {MAX_SEED - self.n + 1}", "seed")
        return [base + i for i in range(self.n)]


class CascadeInfo(BaseModel):
    """Why a cascade answered as it did (see ``glideserve.outputs.CascadeVerdict``)."""

    light_model: str
    confidence: float
    threshold: float
    escalated: bool
    reason: Literal["confident", "below_threshold", "heavy_refused"]


class ImageData(BaseModel):
    """One generated image: inline PNG (``b64_json``) or a temporary ``url``, its seed, the model that
    made it (``served_by``) and, from a cascade, why (``cascade``)."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: None = None
    seed: int
    served_by: str | None = None
    cascade: CascadeInfo | None = None


class ImageTimings(BaseModel):
    """Engine-measured seconds for one image (see ``glideserve.outputs.RequestTimings``)."""

    queued_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    steps: int
    full_steps: int = Field(description="steps that ran every block")
    cached_steps: int = Field(description="steps that reused the request's feature cache")


class ResponseTimings(BaseModel):
    """Server-side view of a whole request: wall time from arrival to the last image."""

    total_s: float
    slo_ms: float | None = None
    slo_met: bool | None = None
    images: list[ImageTimings]


class ImagesResponse(BaseModel):
    """Response of a non-streaming generation, shaped like OpenAI's ``ImagesResponse``."""

    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str
    timings: ResponseTimings


class ProgressEvent(BaseModel):
    """Stream event (extension): a waiting request's queue position, or a finished step.

    While waiting, ``step`` is 0 and ``queue_position`` counts requests ahead (0 = next);
    once running, ``queue_position`` is null and ``step`` runs from 1 to ``total``.
    """

    type: Literal["image_generation.progress"] = "image_generation.progress"
    request_id: str
    image_index: int
    step: int
    total: int
    queue_position: int | None = None
    created_at: int = Field(default_factory=lambda: int(time.time()))


class LoadingEvent(BaseModel):
    """Stream event (extension): the image's model is not resident and is being loaded first,
    predicted to take ``estimated_s`` more seconds; progress events follow once it has."""

    type: Literal["image_generation.loading"] = "image_generation.loading"
    request_id: str
    image_index: int
    model: str
    estimated_s: float
    created_at: int = Field(default_factory=lambda: int(time.time()))


class PartialImageEvent(BaseModel):
    """OpenAI's ``image_generation.partial_image``: a low-resolution preview of one image."""

    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    output_format: Literal["png"] = "png"
    partial_image_index: int
    quality: Literal["auto"] = "auto"
    size: str
    image_index: int
    step: int
    cascade: CascadeInfo | None = Field(default=None, description="set on the light model's image when a "
                                        "cascade escalates: the heavy model's answer follows")


class CompletedEvent(BaseModel):
    """OpenAI's ``image_generation.completed``: the final image, one event per image."""

    type: Literal["image_generation.completed"] = "image_generation.completed"
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    output_format: Literal["png"] = "png"
    quality: Literal["auto"] = "auto"
    size: str
    image_index: int
    seed: int
    timings: ImageTimings
    served_by: str | None = None
    cascade: CascadeInfo | None = None


class ErrorBody(BaseModel):
    """The inside of OpenAI's error envelope; ``param`` names the offending field."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope ``{"error": {...}}``, used by every non-2xx answer."""

    error: ErrorBody


class StreamErrorEvent(BaseModel):
    """A stream's last event when it ends without an image (cancelled or failed)."""

    type: Literal["error"] = "error"
    error: ErrorBody


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``: OpenAI's fields, then what this server knows of the model.

    ``loaded`` says whether its weights are resident now (an unloaded model loads on its
    next request); ``family``, ``default_size`` and ``default_steps`` are the defaults a
    request gets; ``default`` marks the model of requests that name none. ``compiled``
    (with ``--compile``) lists the row buckets, the graphs compiled at start-up, their
    seconds, and the block calls that ran eager at a shape not compiled.
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glideserve"
    family: str | None = None
    default_size: str | None = None
    default_steps: int | None = None
    loaded: bool = True
    default: bool = False
    compiled: dict | None = None


class ModelList(BaseModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraCard(BaseModel):
    """One adapter of the server's LoRA directory; rank and target layers once it has been read."""

    name: str
    object: Literal["lora"] = "lora"
    resident: bool
    rank: int | None = None
    target_modules: list[str] | None = None


class LoraDeleted(BaseModel):
    """Response of ``DELETE /v1/loras/{name}``."""

    name: str
    object: Literal["lora"] = "lora"
    deleted: bool = True


class LoraList(BaseModel):
    """Response of ``GET /v1/loras``."""

    object: Literal["list"] = "list"
    data: list[LoraCard]


class CancelResponse(BaseModel):
    """Response of ``DELETE /v1/requests/{id}``: the request will stop at its next step."""

    id: str
    object: Literal["request"] = "request"
    cancelled: bool


class ServerStats(BaseModel):
    """Response of ``GET /v1/stats``: a live snapshot for dashboards and the playground."""

    model: str
    ready: bool
    draining: bool
    queue_depth: int
    running: int
    last_batch_requests: int
    last_batch_rows: int
    last_step_s: float
    steps_total: int
    images_per_min: float
    active_requests: int
    paused: int = 0
    refused_total: int = 0
    dropped_total: int = 0
    preempted_total: int = 0
    resumed_total: int = 0


class HealthResponse(BaseModel):
    """Response of ``GET /health`` and ``GET /ready``."""

    status: str
    detail: str | None = None


class StartupStatus(BaseModel):
    """What a server that is still loading does: ``stage`` (loading, compiling the blocks of, profiling
    the latency of) and ``model``; ``done`` of ``total`` ``unit`` where the stage counts them (compiled
    bucket shapes: row buckets x image sizes), ``detail`` (the last one finished) and seconds since start-up."""

    stage: str
    model: str | None = None
    done: int | None = None
    total: int | None = None
    unit: str = ""
    detail: str = ""
    elapsed_s: float


class StartingResponse(ErrorResponse):
    """``GET /ready`` (503) while the server loads its models: the ``not_ready`` error, and the progress."""

    startup: StartupStatus


def error_type_for(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status; ``code`` carries the specific reason."""
    if status >= 500:
        return "server_error"
    return {429: "rate_limit_error", 499: "cancelled"}.get(status, "invalid_request_error")


def error_response_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The envelope ``{"error": {message, type, param, code}}`` for an answer with ``status``."""
    error_type = error_type_for(status)
    return ErrorResponse(error=ErrorBody(message=message, type=error_type, param=param, code=code)).model_dump()


class FineTuneHyperparameters(BaseModel):
    """Training settings of a fine-tuning job (LoRA on the model's denoiser)."""

    model_config = ConfigDict(extra="forbid")

    n_steps: int = Field(200, ge=1, le=100_000, description="optimizer steps")
    batch_size: int = Field(4, ge=1, le=64)
    learning_rate: float = Field(1e-3, gt=0, le=1.0, allow_inf_nan=False)
    lora_rank: int = Field(8, ge=1, le=128)
    lora_alpha: float | None = Field(None, gt=0, le=1024, allow_inf_nan=False)
    target_modules: list[str] | None = Field(None, min_length=1, max_length=16)
    checkpoint_every: int = Field(50, ge=1, le=100_000)


class FineTuningJobRequest(BaseModel):
    """``POST /v1/fine_tuning/jobs``, after OpenAI's: the served ``model``, a dataset (``training_file``: a
    folder under the server's --data-dir, or the id ``POST /v1/files`` returned), the adapter's name
    (``suffix``), ``seed`` and the hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    training_file: str = Field(min_length=1, max_length=64)
    suffix: str = Field(min_length=1, max_length=64, description="the adapter's name once trained")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    hyperparameters: FineTuneHyperparameters = FineTuneHyperparameters()
