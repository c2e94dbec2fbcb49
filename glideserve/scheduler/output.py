"""The contract between scheduler and runner: what the runner is told, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from collections.abc import Mapping

from PIL import Image

from glideserve.cache.policy import StepKind
from glideserve.params import GenerationParams


@dataclass(frozen=True)
class NewRequestData:
    """Everything the runner needs to prefill a request, sent once, at its first step."""

    request_id: str
    params: GenerationParams  # resolved: no defaults left to fill
    cache_granted: bool = False  # the memory ledger holds room for its feature cache


@dataclass(frozen=True)
class SchedulerOutput:
    """One engine step's plan.

    - ``new_requests`` are prefilled (text encoded, noise drawn) and then stepped;
    - ``scheduled`` lists every request id that advances one denoising step now, new
      and resumed ones included, grouped by the runner per image size;
    - ``freed`` lists ids whose runner state must be released before anything runs
      (aborted or dropped requests);
    - ``decode`` lists requests whose denoising is done and whose image is decoded now,
      in one batched VAE call per size; the runner keeps a denoised request's latents
      until it is listed here (or freed);
    - ``encode_ahead`` holds prompt texts of waiting requests, encoded in the same
      text-encoder call as the new requests' so that their own prefill hits the cache;
    - ``preempted`` ids were paused at this step boundary: not stepped, their runner
      state kept; ``resumed`` ids run again (listed in ``scheduled`` too);
    - ``step_kinds`` gives each scheduled id's step kind (full, cached, or left to the
      row's own cache statistics); ids not listed take a full step.
    """

    new_requests: tuple[NewRequestData, ...] = ()
    scheduled: tuple[str, ...] = ()
    freed: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    encode_ahead: tuple[str, ...] = ()
    preempted: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    step_kinds: Mapping[str, StepKind] = field(default_factory=dict)
    num_rows: int = 0
    num_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.scheduled or self.freed or self.decode)


@dataclass(frozen=True)
class FinishedImage:
    """A decoded image and the seconds of the batched decode call that produced it."""

    image: Image.Image
    decode_s: float


@dataclass(frozen=True)
class GroupTiming:
    """One denoising forward: image size (as latent tokens per row), rows, requests and seconds
    (the forward plus the per-request sampler updates); ``cached_rows`` of the ``rows`` reused
    their feature cache instead of running every block."""

    tokens_per_row: int
    rows: int
    requests: int
    seconds: float
    cached_rows: int = 0


@dataclass(frozen=True)
class DecodeTiming:
    """One batched VAE decode: image size (as latent tokens per row), images and seconds."""

    tokens_per_row: int
    images: int
    seconds: float


@dataclass
class StageTiming:
    """Seconds one ``execute`` spent per stage; ``prefill_requests`` counts the requests whose
    prompts the prefill encoded (new and encoded-ahead)."""

    prefill_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    prefill_requests: int = 0
    groups: list[GroupTiming] = field(default_factory=list)
    decodes: list[DecodeTiming] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.denoise_s + self.decode_s


@dataclass
class RunnerOutput:
    """What one ``ModelRunner.execute`` did.

    ``stepped``: ids that advanced one denoising step; ``finished``: decoded images by
    id; ``failed``: error messages by id (their runner state is already released);
    ``previews``: low-resolution images of the predicted clean image, for requests that
    asked; ``timing``: seconds per stage and per forward group; ``step_kinds``: the kind
    (full or cached) each stepped request's step actually took; ``cache_change``: for
    requests whose policy measures it, the relative change of their inputs at this step.
    """

    stepped: list[str] = field(default_factory=list)
    finished: dict[str, FinishedImage] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    previews: dict[str, Image.Image] = field(default_factory=dict)
    timing: StageTiming = field(default_factory=StageTiming)
    step_kinds: dict[str, StepKind] = field(default_factory=dict)
    cache_change: dict[str, float] = field(default_factory=dict)
