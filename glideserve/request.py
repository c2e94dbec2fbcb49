"""Scheduler-side request state. Only the scheduler mutates a Request."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from glideserve.cache.policy import NO_CACHE, CachePolicy
from glideserve.params import GenerationParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # preempted at a step boundary; its latents and sampler stay in the runner
    FINISHED = "finished"
    ABORTED = "aborted"
    DROPPED = "dropped"  # predicted to miss its deadline by more than the tolerance
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    """One admitted request as the scheduler sees it: progress, cost and deadline, no tensors.

    ``num_steps`` is the number of denoising iterations (model evaluations) the
    request's sampler will take; ``rows`` is 2 with classifier-free guidance, else 1;
    ``tokens_per_row`` is the latent token count of one row at the request's size.
    Requests are batched only with requests of the same ``shape_key``. ``deadline``
    is ``arrival_time + slo_ms`` on the scheduler's clock, or ``None`` (best effort).
    ``bypassed_steps`` counts steps in which a later request was admitted while this
    one did not fit the budget (bounded, so a large image cannot starve);
    ``decode_waits`` the steps its finished latents waited to be decoded with others.
    ``aged_deadline`` is set on a best-effort request that has waited too long: it is
    then ordered as if it had that deadline (never refused or dropped for it).

    Step caching: ``cache_policy`` is the request's resolved policy; ``cache_bytes``
    what its feature cache needs; ``cache_granted`` whether the memory ledger gave it
    (without it the request takes full steps only); ``cache_counter`` the counter of the
    counter policies (for ``adaptive``, minus its cached streak); ``cache_drift`` the change
    of its inputs measured since its last full step; ``full_steps``/``cached_steps`` count
    the kinds its steps took.
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
    denoised_time: float | None = None
    queue_position: int | None = None
    bypassed_steps: int = 0
    decode_waits: int = 0
    preemptions: int = 0
    prefetched: bool = False
    aged_deadline: float | None = None
    cache_policy: CachePolicy = NO_CACHE
    cache_bytes: int = 0
    cache_granted: bool = False
    cache_counter: int = 0
    cache_drift: float = 0.0
    full_steps: int = 0
    cached_steps: int = 0

    @property
    def shape_key(self) -> tuple[int, int]:
        return (self.params.height, self.params.width)

    @property
    def cost_tokens(self) -> int:
        return self.rows * self.tokens_per_row

    @property
    def denoising_done(self) -> bool:
        return self.steps_done >= self.num_steps

    @property
    def remaining_steps(self) -> int:
        return self.num_steps - self.steps_done

    @property
    def slo_s(self) -> float | None:
        return None if self.params.slo_ms is None else self.params.slo_ms / 1000.0

    @property
    def deadline(self) -> float | None:
        slo = self.slo_s
        return None if slo is None else self.arrival_time + slo

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def effective_deadline(self) -> float | None:
        """The deadline the policy orders by: the request's own, or the one it got by aging."""
        return self.deadline if self.deadline is not None else self.aged_deadline
