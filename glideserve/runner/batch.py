"""The runner's persistent batch: per-request tensors that live across steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glideserve.params import GenerationParams
from glideserve.runner.families.base import Cond
from glideserve.runner.feature_cache import FeatureCache
from glideserve.runner.samplers import Sampler


@dataclass(eq=False)
class RequestState:
    """Runner-side state of one request: its latents, sampler and conditioning rows.

    ``cond`` holds ``rows`` rows (unconditional first when guidance is on), so the
    batch's conditioning is the concatenation of its members' ``cond`` in order.
    ``tokens_per_row`` (latent tokens of one row at its size) keys its timings.
    ``cache`` is its feature cache (None when it caches nothing, or once denoised).
    """

    request_id: str
    params: GenerationParams
    latents: torch.Tensor
    sampler: Sampler
    cond: Cond
    generator: torch.Generator
    tokens_per_row: int
    preview_steps: frozenset[int] = frozenset()
    cache: FeatureCache | None = None
    lora: tuple = ()  # ((LoraAdapter, scale), ...) for every row of the request

    @property
    def rows(self) -> int:
        return 2 if self.params.uses_cfg else 1

    @property
    def shape_key(self) -> tuple[int, int]:
        return (self.params.height, self.params.width)


class PersistentBatch:
    """Request states keyed by id, plus the concatenated conditioning of each shape group.

    Conditioning tensors do not change during a request's life, so the batched
    conditioning is rebuilt only when the membership or order of a group changes.
    """

    def __init__(self):
        self._states: dict[str, RequestState] = {}
        self._cond_cache: dict[tuple[int, int], tuple[tuple[str, ...], Cond]] = {}

    def add(self, state: RequestState) -> None:
        self._states[state.request_id] = state

    def remove(self, request_id: str) -> RequestState | None:
        return self._states.pop(request_id, None)

    def get(self, request_id: str) -> RequestState | None:
        return self._states.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def groups(self, request_ids) -> dict[tuple[int, int], list[RequestState]]:
        """Scheduled states grouped by image size, preserving the scheduler's order."""
        groups: dict[tuple[int, int], list[RequestState]] = {}
        for rid in request_ids:
            state = self._states.get(rid)
            if state is not None:
                groups.setdefault(state.shape_key, []).append(state)
        return groups

    def group_cond(self, key: tuple[int, int], states: list[RequestState]) -> Cond:
        ids = tuple(s.request_id for s in states)
        cached = self._cond_cache.get(key)
        if cached is not None and cached[0] == ids:
            return cached[1]
        cond = {name: torch.cat([s.cond[name] for s in states]) for name in states[0].cond}
        self._cond_cache[key] = (ids, cond)
        return cond
