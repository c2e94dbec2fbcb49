"""The contract between scheduler and runner: the only thing the runner is told."""

from __future__ import annotations

from dataclasses import dataclass, field

from glideserve.params import GenerationParams


@dataclass(frozen=True)
class NewRequestData:
    """Everything the runner needs to prefill a request, sent once, at its first step."""

    request_id: str
    params: GenerationParams  # resolved: no defaults left to fill


@dataclass(frozen=True)
class SchedulerOutput:
    """One engine step's plan.

    ``new_requests`` are prefilled (text encoded, noise drawn) and then stepped;
    ``scheduled`` lists every request id that advances one denoising step now, new
    ones included, in batch order; ``freed`` lists ids whose runner state must be
    released before anything runs (aborted requests). The runner releases a request
    that finished denoising by itself, once its image is decoded.
    """

    new_requests: tuple[NewRequestData, ...] = ()
    scheduled: tuple[str, ...] = ()
    freed: tuple[str, ...] = ()
    num_rows: int = 0
    num_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.scheduled or self.freed)


@dataclass
class RunnerOutput:
    """What one ``ModelRunner.execute`` did: which requests stepped, finished or failed.

    ``finished`` maps request id to ``(PIL image, decode seconds)``; ``failed`` maps
    request id to an error message; ``previews`` maps request id to a low-resolution
    PIL image of its current latents (only for requests that asked); ``timing`` holds seconds spent per stage.
    """

    stepped: list[str] = field(default_factory=list)
    finished: dict = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    previews: dict = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
