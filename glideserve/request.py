"""Scheduler-side request state. Only the scheduler mutates a Request."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from glideserve.params import GenerationParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    """One admitted request as the scheduler sees it: progress and cost, no tensors.

    ``num_steps`` is the number of denoising iterations (model evaluations) the
    request's sampler will take; ``rows`` is 2 with classifier-free guidance, else 1;
    ``tokens_per_row`` is the latent token count of one row at the request's size.
    Requests are batched only with requests of the same ``shape_key``.
    """

    request_id: str
    params: GenerationParams
    num_steps: int
    rows: int
    tokens_per_row: int
    arrival_time: float
    status: RequestStatus = RequestStatus.WAITING
    steps_done: int = 0
    first_step_time: float | None = None
    last_step_time: float | None = None
    queue_position: int | None = None

    @property
    def shape_key(self) -> tuple[int, int]:
        return (self.params.height, self.params.width)

    @property
    def cost_tokens(self) -> int:
        return self.rows * self.tokens_per_row

    @property
    def denoising_done(self) -> bool:
        return self.steps_done >= self.num_steps
